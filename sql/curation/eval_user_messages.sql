-- One row per user message of a registered evaluation item: what training must not contain.
SELECT
    item_id,
    unnest(list_transform(list_filter(chosen, m -> m.role = 'user'), m -> m.content)) AS text
FROM music.eval_items
