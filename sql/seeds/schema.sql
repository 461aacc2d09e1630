-- Tables written by the seed ingestion assets.
-- The DuckDB Polars IO manager inserts DataFrames positionally, and music_assets/common/tables.py
-- derives each DataFrame's Polars schema from these statements, so the schema files are the one
-- definition of the columns. music_assets/common/tables.py runs them all, in stage order.
CREATE SCHEMA IF NOT EXISTS music;

-- One row per preference pair (kind = 'pair') or prompt-only context (kind = 'prompts').
CREATE TABLE IF NOT EXISTS music.seed_conversations (
    -- seed partition key: the source name, or '<name>/shard-NNN-of-KKK' for a source with `shards: K`
    -- (music_assets/seeds/shards.py). Every partition-scoped statement (the IO manager's replace,
    -- the simulation's resume queries) filters on it, so shards never touch each other's rows.
    source            VARCHAR NOT NULL,
    row_number        BIGINT NOT NULL,    -- 1-based line / record number in the source
    pair_id           VARCHAR NOT NULL,   -- '<source name>/<row_number>' (no shard in it), unique across sources
    kind              VARCHAR NOT NULL,   -- 'pair' | 'prompts'
    format            VARCHAR NOT NULL,   -- input format the row was parsed as
    original_id       VARCHAR,            -- the source's own id, when it has one
    chosen            STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected          STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    prefix_messages   INTEGER NOT NULL,   -- leading messages chosen and rejected share
    chosen_messages   INTEGER NOT NULL,
    rejected_messages INTEGER NOT NULL,
    user_turns        INTEGER NOT NULL,   -- user messages in the chosen conversation
    context_hash      VARCHAR NOT NULL,   -- hash of the shared prefix: groups pairs of one conversation
    content_hash      VARCHAR NOT NULL,   -- hash of (chosen, rejected): stable across runs and sources
    extra             VARCHAR             -- JSON of the source's other fields (subset, domain, ...)
);

-- Rows that could not be normalized: nothing is dropped without a trace.
CREATE TABLE IF NOT EXISTS music.seed_quarantine (
    source      VARCHAR NOT NULL,   -- seed partition key, as in seed_conversations
    row_number  BIGINT NOT NULL,
    rule        VARCHAR NOT NULL,   -- short class: malformed_json, missing_field, empty_message, ...
    field       VARCHAR NOT NULL,   -- the field at fault ('' when the whole record is)
    reason      VARCHAR NOT NULL,
    raw_excerpt VARCHAR NOT NULL    -- first 500 characters of the original record
);
