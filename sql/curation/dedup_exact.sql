-- Exact duplicates: the same normalized pair text as an earlier (keep-order) document.
INSERT INTO dedup_flags
SELECT
    d.doc,
    'exact' AS rule,
    'same normalized text' AS detail,
    first_doc.pair_id AS duplicate_of,
    1.0 AS similarity
FROM (
    SELECT
        docs.doc,
        docs.pair_id,
        docs.exact_hash,
        min(docs.doc) OVER (PARTITION BY docs.exact_hash) AS first
    FROM dedup_docs AS docs ANTI JOIN dedup_flags USING (doc)
) AS d
INNER JOIN dedup_docs AS first_doc ON d.first = first_doc.doc
WHERE d.doc <> d.first
