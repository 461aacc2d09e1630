SELECT
    context_id,
    source,
    messages
FROM music.seed_contexts
WHERE source = $source
ORDER BY context_id;
