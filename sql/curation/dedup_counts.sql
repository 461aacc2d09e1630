-- Input pairs vs where they went: the three must add up.
SELECT
    (SELECT count(*) FROM training_candidates) AS input_pairs,
    (SELECT count(*) FROM music.deduplicated_pairs) AS kept,
    (SELECT count(*) FROM music.dedup_removed) AS removed,
    (SELECT count(*) FROM music.dedup_quarantine) AS quarantined
