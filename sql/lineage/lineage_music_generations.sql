-- The MUSIC pairs in one variant's splits, grouped by what generated them: each pair row carries
-- its generation key, prompt version, engine identities and sampling settings.
SELECT
    m.source,
    m.generation_key,
    m.prompt_version,
    m.models,
    m.sampling,
    count(*) AS pairs,
    count(*) FILTER (WHERE t.split = 'train') AS train_pairs
FROM music.training_splits AS t
INNER JOIN music.music_pairs AS m ON t.source = m.source AND t.pair_id = m.pair_id
WHERE t.variant = $variant AND t.origin = 'music'
GROUP BY m.source, m.generation_key, m.prompt_version, m.models, m.sampling
ORDER BY m.source, m.generation_key;
