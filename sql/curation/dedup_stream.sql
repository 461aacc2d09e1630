-- The pairs to deduplicate, in keep-order, as the text dedup compares. `dedup_source` is a view
-- with columns (pair_id, priority, chosen, rejected); lower priority wins a duplicate group.
-- Bad rows are flagged here, not filtered, so each one reaches the quarantine with its reason.
SELECT
    pair_id,
    CASE
        WHEN pair_id IS NULL OR trim(pair_id) = '' THEN 'missing_id'
        WHEN row_number() OVER (PARTITION BY pair_id ORDER BY priority) > 1 THEN 'duplicate_id'
        WHEN
            chosen IS NULL OR rejected IS NULL
            OR list_bool_or(list_transform(
                chosen || rejected,
                m -> m IS NULL OR m.role IS NULL OR m.content IS NULL
            )) THEN 'non_string_content'
    END AS bad_rule,
    pair_text(chosen, rejected) AS text,
    list_distinct(list_transform(
        list_filter(coalesce(chosen, []) || coalesce(rejected, []), m -> m.role = 'user' AND m.content IS NOT NULL),
        m -> m.content
    )) AS user_messages
FROM dedup_source
ORDER BY priority, pair_id NULLS FIRST
