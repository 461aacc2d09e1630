-- After re-deduplicating the augmented variant held-out first (split_leak_source.sql): train
-- pairs that duplicate a validation/test pair, and any pair that leaks an eval item.
SELECT
    r.pair_id,
    s.split,
    r.rule,
    r.duplicate_of,
    dup.split AS duplicate_split,
    r.similarity
FROM dedup_removed AS r
INNER JOIN music.training_splits AS s ON r.pair_id = s.pair_id AND s.variant = 'music'
LEFT JOIN music.training_splits AS dup ON r.duplicate_of = dup.pair_id AND dup.variant = 'music'
WHERE r.rule = 'eval_leak' OR (s.split = 'train' AND dup.split IN ('validation', 'test'))
ORDER BY r.pair_id
