-- Tables the MUSIC simulation writes as it goes (not through the IO manager): every finished turn
-- is committed when it is produced, so a crashed run resumes instead of starting over.
CREATE SCHEMA IF NOT EXISTS music;

-- One row per finished simulated turn (a user message and the assistant's answer) of one branch.
-- Turns before the contrast turn are shared by both branches (branch = 'shared'); from the contrast
-- turn on there is one 'chosen' and one 'rejected' row per turn.
CREATE TABLE IF NOT EXISTS music.simulated_branches (
    turn_key             VARCHAR PRIMARY KEY,  -- hash(context_id, branch, turn, generation_key)
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
    created_at           TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Contexts the simulation gave up on, with the reason: nothing is dropped silently, and a rerun
-- does not try them again under the same generation key.
CREATE TABLE IF NOT EXISTS music.simulation_drops (
    generation_key VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,
    context_id     VARCHAR NOT NULL,
    turn           INTEGER NOT NULL,
    stage          VARCHAR NOT NULL,   -- 'user' | 'rewrite' | 'assistant'
    reason         VARCHAR NOT NULL,   -- 'empty', 'truncated', 'user_answered_as_assistant', 'rewrite_unchanged', ...
    last_output    VARCHAR NOT NULL,   -- excerpt of the last rejected output
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (generation_key, context_id)
);

-- The generation key each seed partition was last simulated under, with what it stands for:
-- music_pairs assembles exactly these rows, and the lineage audit reads models and settings here.
CREATE TABLE IF NOT EXISTS music.simulation_runs (
    source         VARCHAR PRIMARY KEY,
    generation_key VARCHAR NOT NULL,
    prompt_version VARCHAR NOT NULL,
    models         VARCHAR NOT NULL,   -- JSON
    settings       VARCHAR NOT NULL,   -- JSON, sampling parameters included
    finished_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
