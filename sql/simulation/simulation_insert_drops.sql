INSERT OR IGNORE INTO music.simulation_drops BY NAME SELECT * FROM new_drops;
