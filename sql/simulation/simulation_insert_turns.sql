-- new_turns / new_drops are DataFrames registered by the caller. OR IGNORE: a turn key that is
-- already there was committed by an earlier attempt and is kept as it is.
INSERT OR IGNORE INTO music.simulated_branches BY NAME SELECT * FROM new_turns;
