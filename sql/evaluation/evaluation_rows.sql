-- What a reward model is evaluated on: the held-out (test) pairs of the augmented variant, which
-- holds both the seed and the MUSIC test pairs (the same groups are test in both variants), and
-- the preference pairs of every registered evaluation set.
SELECT
    CASE d.origin WHEN 'seed' THEN 'heldout_seed' ELSE 'heldout_music' END AS eval_set,
    d.pair_id AS item_id,
    NULL AS subset,
    d.user_turns,
    d.chosen,
    d.rejected
FROM music.training_splits AS s INNER JOIN music.deduplicated_pairs AS d USING (pair_id)
WHERE s.variant = 'music' AND s.split = 'test'
UNION ALL
SELECT
    eval_set,
    item_id,
    subset,
    user_turns,
    chosen,
    rejected
FROM music.eval_items
WHERE kind = 'pair'
ORDER BY eval_set, item_id
