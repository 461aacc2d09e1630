-- new_turns / new_drops are DataFrames registered by the caller. A turn key that is already there
-- was committed by an earlier attempt and is kept as it is (an anti-join, not INSERT OR IGNORE:
-- DuckLake tables have no primary key).
INSERT INTO music.simulated_branches BY NAME
SELECT
    n.*,
    current_timestamp AS created_at
FROM new_turns AS n ANTI JOIN music.simulated_branches AS b ON n.turn_key = b.turn_key;
