SELECT count(*)
FROM music.simulated_branches
WHERE source = $source AND generation_key = $generation_key;
