-- The augmented variant's pairs, held-out splits first: re-deduplicating them, any train pair
-- found to duplicate an earlier (held-out) pair or an eval item is a leak.
CREATE OR REPLACE TEMP VIEW dedup_source AS
SELECT
    s.pair_id,
    CASE s.split WHEN 'test' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END AS priority,
    d.chosen,
    d.rejected
FROM music.training_splits AS s INNER JOIN music.deduplicated_pairs AS d USING (pair_id)
WHERE s.variant = 'music';
