-- The turn rows of one partition under one generation key (what simulated_branches reports).
SELECT *
FROM music.simulated_branches
WHERE source = $source AND generation_key = $generation_key
ORDER BY context_id, turn, branch;
