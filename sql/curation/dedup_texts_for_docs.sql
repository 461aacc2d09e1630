-- Texts of some documents (registered as `wanted_docs(doc)`), re-read for exact verification.
SELECT
    w.doc,
    pair_text(s.chosen, s.rejected) AS text
FROM wanted_docs AS w
INNER JOIN dedup_docs AS d ON w.doc = d.doc
INNER JOIN dedup_source AS s ON d.pair_id = s.pair_id
QUALIFY row_number() OVER (PARTITION BY w.doc ORDER BY s.priority) = 1
ORDER BY w.doc
