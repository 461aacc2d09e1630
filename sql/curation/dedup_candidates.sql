-- LSH candidates: documents that share a band key with the band's first (keep-order) document.
-- Documents already removed (exact duplicates, eval leaks, quarantine) take no part.
WITH live AS (
    SELECT b.* FROM dedup_bands AS b ANTI JOIN dedup_flags AS f ON b.doc = f.doc
),

leaders AS (
    SELECT
        key,
        min(doc) AS leader
    FROM live
    GROUP BY key
    HAVING count(*) > 1
)

SELECT DISTINCT
    l.doc,
    k.leader
FROM live AS l INNER JOIN leaders AS k ON l.key = k.key
WHERE l.doc <> k.leader
ORDER BY l.doc, k.leader
