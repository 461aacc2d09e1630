-- Where Best-of-N starts: the held-out seed test pairs (their chosen conversation, whose last
-- answer Best-of-N replaces) and every prompt-only evaluation set (MT-Bench: the user turns).
SELECT
    'heldout_seed' AS source,
    d.pair_id AS context_id,
    d.chosen AS messages
FROM music.training_splits AS s INNER JOIN music.deduplicated_pairs AS d USING (pair_id)
WHERE s.variant = 'music' AND s.split = 'test' AND d.origin = 'seed'
UNION ALL
SELECT
    eval_set AS source,
    item_id AS context_id,
    chosen AS messages
FROM music.eval_items
WHERE kind = 'prompts'
ORDER BY source, context_id
