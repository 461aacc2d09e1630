-- Everything already committed for one seed partition under one generation key (resume state).
SELECT
    context_id,
    branch,
    turn,
    user_message,
    assistant_message,
    modified_instruction
FROM music.simulated_branches
WHERE source = $source AND generation_key = $generation_key
ORDER BY context_id, turn, branch;
