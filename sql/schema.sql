-- Tables written by the seed ingestion assets. The DuckDB Polars IO manager inserts DataFrames
-- positionally, and music_assets/tables.py derives each DataFrame's Polars schema from these
-- statements, so this file is the one definition of the columns.
CREATE SCHEMA IF NOT EXISTS music;

-- One row per preference pair (kind = 'pair') or prompt-only context (kind = 'prompts').
CREATE TABLE IF NOT EXISTS music.seed_conversations (
    source            VARCHAR NOT NULL,   -- seed partition key
    row_number        BIGINT  NOT NULL,   -- 1-based line / record number in the source
    pair_id           VARCHAR NOT NULL,   -- '<source>/<row_number>', unique across sources
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
    source      VARCHAR NOT NULL,
    row_number  BIGINT  NOT NULL,
    rule        VARCHAR NOT NULL,   -- short class: malformed_json, missing_field, empty_message, ...
    field       VARCHAR NOT NULL,   -- the field at fault ('' when the whole record is)
    reason      VARCHAR NOT NULL,
    raw_excerpt VARCHAR NOT NULL    -- first 500 characters of the original record
);

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

-- Registered evaluation sets (held-out files: RewardBench-format rows, MT-Bench prompts, ...),
-- normalized like the seeds. Training data must not contain them: dedup removes leaks.
CREATE TABLE IF NOT EXISTS music.eval_items (
    eval_set    VARCHAR NOT NULL,
    item_id     VARCHAR NOT NULL,   -- '<eval_set>/<row_number>'
    row_number  BIGINT  NOT NULL,
    kind        VARCHAR NOT NULL,   -- 'pair' | 'prompts'
    subset      VARCHAR,            -- the row's `subset` / category field, when it has one
    chosen      STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected    STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    user_turns  INTEGER NOT NULL,
    extra       VARCHAR
);

CREATE TABLE IF NOT EXISTS music.eval_quarantine (
    eval_set    VARCHAR NOT NULL,
    row_number  BIGINT  NOT NULL,
    rule        VARCHAR NOT NULL,
    field       VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    raw_excerpt VARCHAR NOT NULL
);

-- Seed pairs (origin 'seed', the baseline set D) and MUSIC pairs ('music') that survived dedup.
CREATE TABLE IF NOT EXISTS music.deduplicated_pairs (
    origin      VARCHAR NOT NULL,   -- 'seed' | 'music'
    source      VARCHAR NOT NULL,   -- seed partition
    pair_id     VARCHAR NOT NULL,
    group_id    VARCHAR NOT NULL,   -- the seed conversation: a split never separates a group
    user_turns  INTEGER NOT NULL,
    chosen      STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected    STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL
);

-- Every pair dedup removed, with what it duplicates: nothing disappears without a trace.
CREATE TABLE IF NOT EXISTS music.dedup_removed (
    pair_id      VARCHAR NOT NULL,
    origin       VARCHAR NOT NULL,
    rule         VARCHAR NOT NULL,   -- 'exact' | 'near' | 'eval_leak'
    duplicate_of VARCHAR NOT NULL,   -- the kept pair_id, or the eval item_id
    similarity   DOUBLE  NOT NULL,   -- 1.0 exact; word-shingle Jaccard (near); containment (eval_leak)
    detail       VARCHAR NOT NULL
);

-- Pairs dedup could not judge (missing id, non-string content, no words): kept out of training.
CREATE TABLE IF NOT EXISTS music.dedup_quarantine (
    pair_id VARCHAR,
    origin  VARCHAR,
    rule    VARCHAR NOT NULL,
    reason  VARCHAR NOT NULL
);

-- Which pair trains which variant in which split: 'baseline' = D, 'music' = D + D_MUSIC.
CREATE TABLE IF NOT EXISTS music.training_splits (
    variant    VARCHAR NOT NULL,   -- 'baseline' | 'music'
    split      VARCHAR NOT NULL,   -- 'train' | 'validation' | 'test'
    pair_id    VARCHAR NOT NULL,
    origin     VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    group_id   VARCHAR NOT NULL,
    user_turns INTEGER NOT NULL
);

-- Rewards a checkpoint gives to evaluation pairs: held-out seed and MUSIC test pairs, and the
-- pairs of registered evaluation sets. One row per (variant, eval_set, item).
CREATE TABLE IF NOT EXISTS music.rm_scores (
    variant    VARCHAR NOT NULL,
    checkpoint VARCHAR NOT NULL,
    eval_set   VARCHAR NOT NULL,   -- 'heldout_seed', 'heldout_music', or a registered eval set
    item_id    VARCHAR NOT NULL,
    subset     VARCHAR,
    user_turns INTEGER NOT NULL,
    r_chosen   DOUBLE  NOT NULL,
    r_rejected DOUBLE  NOT NULL
);

-- Multi-turn Best-of-N: each evaluation context continued under each reward model with each N.
-- One row per (context, n, variant); `picks` holds every turn's candidates, their rewards and the pick.
CREATE TABLE IF NOT EXISTS music.bon_conversations (
    run_key     VARCHAR NOT NULL,   -- hash of settings, engines, checkpoints and prompt versions
    source      VARCHAR NOT NULL,   -- 'heldout_seed' or an evaluation set
    context_id  VARCHAR NOT NULL,
    n           INTEGER NOT NULL,
    variant     VARCHAR NOT NULL,
    checkpoint  VARCHAR NOT NULL,
    messages    STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    picks       VARCHAR NOT NULL,   -- JSON: [{turn, candidates: [...], rewards: [...], picked, cut}]
    drop_reason VARCHAR             -- NULL when all turns were generated
);

-- The judge's order-swapped verdict on the baseline vs MUSIC conversations of a (context, n).
-- outcome is from MUSIC's side; NULL when either conversation was dropped (drop_reason says why).
CREATE TABLE IF NOT EXISTS music.bon_judgments (
    run_key         VARCHAR NOT NULL,
    source          VARCHAR NOT NULL,
    context_id      VARCHAR NOT NULL,
    n               INTEGER NOT NULL,
    outcome         VARCHAR,        -- 'win' | 'tie' | 'loss'
    reason          VARCHAR,        -- consistent | judge_tie | inconsistent | unparsed | judge_error | identical
    verdict_forward VARCHAR,        -- baseline shown as A: 'A' | 'B' | 'C' | NULL (unparsed)
    verdict_swapped VARCHAR,        -- MUSIC shown as A
    raw_forward     VARCHAR,
    raw_swapped     VARCHAR,
    drop_reason     VARCHAR
);

-- The judge's order-swapped preference on evaluation pairs (chosen shown first, then swapped),
-- to measure how often each reward model agrees with the judge.
CREATE TABLE IF NOT EXISTS music.judge_verdicts (
    eval_set        VARCHAR NOT NULL,
    item_id         VARCHAR NOT NULL,
    preferred       VARCHAR NOT NULL,   -- 'chosen' | 'rejected' | 'tie'
    reason          VARCHAR NOT NULL,
    verdict_forward VARCHAR,
    verdict_swapped VARCHAR,
    raw_forward     VARCHAR NOT NULL,
    raw_swapped     VARCHAR NOT NULL
);
