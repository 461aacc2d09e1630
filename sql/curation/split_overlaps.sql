-- Pairs or groups (seed conversations) that appear in more than one split of a variant.
SELECT
    variant,
    'pair' AS unit,
    pair_id AS id,
    list(DISTINCT split ORDER BY split) AS splits
FROM music.training_splits
GROUP BY variant, pair_id
HAVING count(DISTINCT split) > 1
UNION ALL
SELECT
    variant,
    'group' AS unit,
    group_id AS id,
    list(DISTINCT split ORDER BY split) AS splits
FROM music.training_splits
GROUP BY variant, group_id
HAVING count(DISTINCT split) > 1
ORDER BY variant, unit, id
