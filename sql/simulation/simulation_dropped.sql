SELECT
    context_id,
    turn,
    stage,
    reason
FROM music.simulation_drops
WHERE source = $source AND generation_key = $generation_key;
