-- The outcome of a run, one place per input row: removed, quarantined, or kept.
CREATE OR REPLACE TEMP TABLE dedup_removed AS
SELECT
    d.pair_id,
    f.duplicate_of,
    f.rule,
    f.similarity,
    f.detail
FROM dedup_flags AS f INNER JOIN dedup_docs AS d USING (doc)
WHERE f.rule IN ('exact', 'near', 'eval_leak')
ORDER BY d.doc;

CREATE OR REPLACE TEMP TABLE dedup_quarantine AS
SELECT
    d.doc,
    d.pair_id,
    f.rule,
    f.detail AS reason
FROM dedup_flags AS f INNER JOIN dedup_docs AS d USING (doc)
WHERE f.rule NOT IN ('exact', 'near', 'eval_leak')
ORDER BY d.doc;

CREATE OR REPLACE TEMP TABLE dedup_kept AS
SELECT
    d.doc,
    d.pair_id
FROM dedup_docs AS d ANTI JOIN dedup_flags USING (doc)
ORDER BY d.doc;

-- Band keys of the kept pairs: the leak check on training splits looks up candidates with them.
CREATE OR REPLACE TEMP TABLE dedup_kept_bands AS
SELECT
    b.doc,
    k.pair_id,
    b.key
FROM dedup_bands AS b INNER JOIN dedup_kept AS k USING (doc);
