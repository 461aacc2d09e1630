-- Tables of the simulation stage: the seed contexts and the MUSIC pairs (written by the IO
-- manager), and the simulated turns, drops and runs that the simulation commits as it goes (not
-- through the IO manager), so that a crashed run resumes instead of starting over.
-- The DuckDB Polars IO manager inserts DataFrames positionally, and music_assets/common/tables.py
-- derives each DataFrame's Polars schema from these statements, so the schema files are the one
-- definition of the columns. music_assets/common/tables.py runs them all, in stage order.
-- The same statements run on DuckLake (the shared warehouse), which has neither keys nor defaults
-- other than literals: the keys noted below are kept by the statements that insert (anti-joins,
-- MERGE), and those statements set the timestamps.
CREATE SCHEMA IF NOT EXISTS music;

-- The prefixes the simulation continues: the first k exchanges of a seed pair's chosen side.
CREATE TABLE IF NOT EXISTS music.seed_contexts (
    source     VARCHAR NOT NULL,
    context_id VARCHAR NOT NULL,   -- hash(pair_id, k, prefix)
    pair_id    VARCHAR NOT NULL,   -- the seed pair it was cut from
    k          INTEGER NOT NULL,   -- exchanges in the prefix
    messages   STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL
);

-- One row per MUSIC pair: the chosen and rejected conversations with their contrast metadata.
CREATE TABLE IF NOT EXISTS music.music_pairs (
    source               VARCHAR NOT NULL,
    pair_id              VARCHAR NOT NULL,   -- 'music/<context_id>'
    context_id           VARCHAR NOT NULL,
    seed_pair_id         VARCHAR NOT NULL,
    k                    INTEGER NOT NULL,   -- exchanges of seed context
    turns                INTEGER NOT NULL,   -- T
    contrast_turn        INTEGER NOT NULL,   -- c
    chosen               STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected             STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    prefix_messages      INTEGER NOT NULL,   -- messages both conversations share
    original_instruction VARCHAR NOT NULL,   -- the user request at turn c
    modified_instruction VARCHAR NOT NULL,   -- its private rewrite, seen only by the rejected assistant
    generation_key       VARCHAR NOT NULL,
    prompt_version       VARCHAR NOT NULL,
    models               VARCHAR NOT NULL,   -- JSON: user simulator, assistant, rewriter identities
    sampling             VARCHAR NOT NULL,   -- JSON: simulation settings incl. sampling parameters
    content_hash         VARCHAR NOT NULL
);

-- One row per finished simulated turn (a user message and the assistant's answer) of one branch.
-- Turns before the contrast turn are shared by both branches (branch = 'shared'); from the contrast
-- turn on there is one 'chosen' and one 'rejected' row per turn.
CREATE TABLE IF NOT EXISTS music.simulated_branches (
    turn_key             VARCHAR NOT NULL,     -- the key: hash(context_id, branch, turn, generation_key)
    generation_key       VARCHAR NOT NULL,     -- hash(prompt version, models, sampling, settings)
    source               VARCHAR NOT NULL,     -- seed partition key
    context_id           VARCHAR NOT NULL,
    branch               VARCHAR NOT NULL,     -- 'shared' | 'chosen' | 'rejected'
    turn                 INTEGER NOT NULL,     -- 1..T, simulated turns after the seed context
    contrast_turn        INTEGER NOT NULL,     -- c: the turn at which the branches diverge
    user_message         VARCHAR NOT NULL,
    assistant_message    VARCHAR NOT NULL,
    modified_instruction VARCHAR,              -- rejected branch: the private instruction in force
    user_attempts        INTEGER NOT NULL,
    assistant_attempts   INTEGER NOT NULL,
    user_tokens          INTEGER NOT NULL,
    assistant_tokens     INTEGER NOT NULL,
    user_finish          VARCHAR NOT NULL DEFAULT 'stop',  -- 'stop' | 'trimmed' | 'continued' (on_length)
    assistant_finish     VARCHAR NOT NULL DEFAULT 'stop',
    created_at           TIMESTAMP NOT NULL
);
-- Warehouses created before on_length existed: their turns were all sampled whole ('stop').
ALTER TABLE music.simulated_branches ADD COLUMN IF NOT EXISTS user_finish VARCHAR DEFAULT 'stop';
ALTER TABLE music.simulated_branches ADD COLUMN IF NOT EXISTS assistant_finish VARCHAR DEFAULT 'stop';

-- Contexts the simulation gave up on, with the reason: nothing is dropped silently, and a rerun
-- does not try them again under the same generation key. The key: (generation_key, context_id).
CREATE TABLE IF NOT EXISTS music.simulation_drops (
    generation_key VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,
    context_id     VARCHAR NOT NULL,
    turn           INTEGER NOT NULL,
    stage          VARCHAR NOT NULL,   -- 'user' | 'rewrite' | 'assistant'
    reason         VARCHAR NOT NULL,   -- 'empty', 'truncated', 'user_answered_as_assistant', 'rewrite_unchanged', ...
    last_output    VARCHAR NOT NULL,   -- excerpt of the last rejected output
    created_at     TIMESTAMP NOT NULL
);

-- The generation key each seed partition was last simulated under, with what it stands for:
-- music_pairs assembles exactly these rows, and the lineage audit reads models and settings here.
CREATE TABLE IF NOT EXISTS music.simulation_runs (
    source         VARCHAR NOT NULL,   -- the key
    generation_key VARCHAR NOT NULL,
    prompt_version VARCHAR NOT NULL,
    models         VARCHAR NOT NULL,   -- JSON
    settings       VARCHAR NOT NULL,   -- JSON, sampling parameters included
    finished_at    TIMESTAMP NOT NULL
);
