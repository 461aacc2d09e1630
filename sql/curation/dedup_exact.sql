-- Exact duplicates: the same normalized pair text as an earlier (keep-order) document.
INSERT INTO dedup_flags
SELECT d.doc, 'exact', 'same normalized text', first_doc.pair_id, 1.0
FROM (
    SELECT doc, pair_id, exact_hash, min(doc) OVER (PARTITION BY exact_hash) AS first
    FROM dedup_docs ANTI JOIN dedup_flags f USING (doc)
) d
JOIN dedup_docs first_doc ON first_doc.doc = d.first
WHERE d.doc <> d.first
