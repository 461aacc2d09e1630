-- Tables of the curation stage: evaluation sets, deduplicated pairs and the training splits.
-- The DuckDB Polars IO manager inserts DataFrames positionally, and music_assets/common/tables.py
-- derives each DataFrame's Polars schema from these statements, so the schema files are the one
-- definition of the columns. music_assets/common/tables.py runs them all, in stage order.
CREATE SCHEMA IF NOT EXISTS music;

-- Registered evaluation sets (held-out files: RewardBench-format rows, MT-Bench prompts, ...),
-- normalized like the seeds. Training data must not contain them: dedup removes leaks.
CREATE TABLE IF NOT EXISTS music.eval_items (
    eval_set   VARCHAR NOT NULL,
    -- item_id: '<eval_set>/<the row's own id>', or '<eval_set>/<row_number>' when ids are missing or repeat
    item_id    VARCHAR NOT NULL,
    row_number BIGINT NOT NULL,
    kind       VARCHAR NOT NULL,   -- 'pair' | 'prompts'
    subset     VARCHAR,            -- the row's `subset` / category field, when it has one
    chosen     STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected   STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    user_turns INTEGER NOT NULL,
    extra      VARCHAR
);

CREATE TABLE IF NOT EXISTS music.eval_quarantine (
    eval_set    VARCHAR NOT NULL,
    row_number  BIGINT NOT NULL,
    rule        VARCHAR NOT NULL,
    field       VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    raw_excerpt VARCHAR NOT NULL
);

-- Seed pairs (origin 'seed', the baseline set D) and MUSIC pairs ('music') that survived dedup.
CREATE TABLE IF NOT EXISTS music.deduplicated_pairs (
    origin     VARCHAR NOT NULL,   -- 'seed' | 'music'
    source     VARCHAR NOT NULL,   -- seed partition
    pair_id    VARCHAR NOT NULL,
    group_id   VARCHAR NOT NULL,   -- the seed conversation: a split never separates a group
    user_turns INTEGER NOT NULL,
    chosen     STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,
    rejected   STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL
);

-- Every pair dedup removed, with what it duplicates: nothing disappears without a trace.
CREATE TABLE IF NOT EXISTS music.dedup_removed (
    pair_id      VARCHAR NOT NULL,
    origin       VARCHAR NOT NULL,
    rule         VARCHAR NOT NULL,   -- 'exact' | 'near' | 'eval_leak'
    duplicate_of VARCHAR NOT NULL,   -- the kept pair_id, or the eval item_id
    similarity   DOUBLE NOT NULL,    -- 1.0 exact; word-shingle Jaccard (near); containment (eval_leak)
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
