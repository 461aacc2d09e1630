-- Replaces the dedup outputs with this run's, in one transaction (a failed run leaves the old ones).
BEGIN TRANSACTION;
DELETE FROM music.deduplicated_pairs;
INSERT INTO music.deduplicated_pairs BY NAME
SELECT
    c.origin,
    c.source,
    c.pair_id,
    c.group_id,
    c.user_turns,
    c.chosen,
    c.rejected
FROM training_candidates AS c SEMI JOIN dedup_kept AS k ON c.pair_id = k.pair_id
ORDER BY c.priority, c.pair_id;

DELETE FROM music.dedup_removed;
INSERT INTO music.dedup_removed BY NAME
SELECT
    r.pair_id,
    c.origin,
    r.rule,
    r.duplicate_of,
    r.similarity,
    r.detail
FROM dedup_removed AS r INNER JOIN training_candidates AS c ON r.pair_id = c.pair_id;

DELETE FROM music.dedup_quarantine;
INSERT INTO music.dedup_quarantine BY NAME
SELECT
    q.pair_id,
    (
        SELECT any_value(c.origin) FROM training_candidates AS c
        WHERE c.pair_id = q.pair_id
    ) AS origin,
    q.rule,
    q.reason
FROM dedup_quarantine AS q;
COMMIT;
