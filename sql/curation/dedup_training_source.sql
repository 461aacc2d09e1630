-- Everything training could use, with its group (seed conversation) and keep-order priority:
-- seed pairs (D) before MUSIC pairs, so a MUSIC pair that duplicates a seed pair is the one removed.
CREATE OR REPLACE TEMP VIEW training_candidates AS
SELECT
    'seed' AS origin,
    0 AS priority,
    source,
    pair_id,
    context_hash AS group_id,
    user_turns,
    chosen,
    rejected
FROM music.seed_conversations
WHERE kind = 'pair'
UNION ALL
SELECT
    'music' AS origin,
    1 AS priority,
    m.source,
    m.pair_id,
    coalesce(s.context_hash, m.seed_pair_id) AS group_id,
    len(list_filter(m.chosen, x -> x.role = 'user')) AS user_turns,
    m.chosen,
    m.rejected
FROM music.music_pairs AS m
LEFT JOIN music.seed_conversations AS s ON m.seed_pair_id = s.pair_id;

CREATE OR REPLACE TEMP VIEW dedup_source AS
SELECT
    pair_id,
    priority,
    chosen,
    rejected
FROM training_candidates;
