-- The committed turns of one partition under the generation key it was last simulated with.
SELECT
    b.context_id,
    b.branch,
    b.turn,
    b.contrast_turn,
    b.user_message,
    b.assistant_message,
    b.modified_instruction,
    r.generation_key,
    r.prompt_version,
    r.models,
    r.settings
FROM music.simulated_branches AS b
INNER JOIN music.simulation_runs AS r ON b.source = r.source AND b.generation_key = r.generation_key
WHERE b.source = $source
ORDER BY b.context_id, b.turn, b.branch;
