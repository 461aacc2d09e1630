-- A context already dropped under this generation key keeps its first reason (see simulation_insert_turns.sql).
INSERT INTO music.simulation_drops BY NAME
SELECT
    n.*,
    current_timestamp AS created_at
FROM new_drops AS n
ANTI JOIN music.simulation_drops AS d ON n.generation_key = d.generation_key AND n.context_id = d.context_id;
