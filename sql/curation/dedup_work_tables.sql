-- Scratch tables of one deduplication run (temporary: they live on the run's connection only).
-- `doc` is the pair's position in keep-order: of two duplicates, the smaller doc survives.
CREATE OR REPLACE TEMP TABLE dedup_docs (doc UINTEGER, pair_id VARCHAR, exact_hash UBIGINT);
CREATE OR REPLACE TEMP TABLE dedup_bands (doc UINTEGER, key UBIGINT);
CREATE OR REPLACE TEMP TABLE dedup_flags (
    doc UINTEGER, rule VARCHAR, detail VARCHAR, duplicate_of VARCHAR, similarity DOUBLE
);
-- The text a pair is compared by: every message of chosen, then of rejected, space-separated.
-- (noqa: CP05 because sqlfluff's DuckDB dialect parses a macro's parameters as data types.)
CREATE OR REPLACE TEMP MACRO pair_text(chosen, rejected) AS (  -- noqa: CP05
    array_to_string(list_transform(coalesce(chosen, []) || coalesce(rejected, []), m -> coalesce(m.content, '')), ' ')
);
