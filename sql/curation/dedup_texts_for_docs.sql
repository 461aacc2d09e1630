-- Texts of some documents (registered as `wanted_docs(doc)`), re-read for exact verification.
SELECT w.doc, pair_text(s.chosen, s.rejected) AS text
FROM wanted_docs w
JOIN dedup_docs d ON d.doc = w.doc
JOIN dedup_source s ON s.pair_id = d.pair_id
QUALIFY row_number() OVER (PARTITION BY w.doc ORDER BY s.priority) = 1
ORDER BY w.doc
