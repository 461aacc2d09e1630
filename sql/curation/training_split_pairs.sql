-- One variant's split with the conversations, in TRL's conversational preference layout, and each
-- pair's group (its seed conversation: training.group_by_conversation batches a group together).
SELECT
    d.pair_id,
    d.origin,
    d.source,
    d.group_id,
    d.chosen,
    d.rejected
FROM music.training_splits AS s
INNER JOIN music.deduplicated_pairs AS d USING (pair_id)
WHERE s.variant = $variant AND s.split = $split
ORDER BY d.pair_id
