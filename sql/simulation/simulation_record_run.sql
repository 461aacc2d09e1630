INSERT OR REPLACE INTO music.simulation_runs (source, generation_key, prompt_version, models, settings)
VALUES ($source, $generation_key, $prompt_version, $models, $settings);
