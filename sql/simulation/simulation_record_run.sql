-- One row per source: replaced by the partition's latest run (MERGE, not INSERT OR REPLACE: DuckLake
-- tables have no primary key).
MERGE INTO music.simulation_runs AS r
USING (
    SELECT
        $source AS source,
        $generation_key AS generation_key,
        $prompt_version AS prompt_version,
        $models AS models,
        $settings AS settings
) AS n
    ON r.source = n.source
WHEN MATCHED THEN
    UPDATE
        SET
            generation_key = n.generation_key,
            prompt_version = n.prompt_version,
            models = n.models,
            settings = n.settings,
            finished_at = current_timestamp
WHEN NOT MATCHED THEN
    INSERT (source, generation_key, prompt_version, models, settings, finished_at)
    VALUES (n.source, n.generation_key, n.prompt_version, n.models, n.settings, current_timestamp);
