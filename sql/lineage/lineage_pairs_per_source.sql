-- Pairs in one variant's splits, per seed source and origin ('seed' = D, 'music' = D_MUSIC).
SELECT
    source,
    origin,
    count(*) AS pairs
FROM music.training_splits
WHERE variant = $variant
GROUP BY source, origin
ORDER BY source, origin;
