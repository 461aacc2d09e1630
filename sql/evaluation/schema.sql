-- Tables of the evaluation stage: reward-model scores, Best-of-N conversations and judgments.
-- The DuckDB Polars IO manager inserts DataFrames positionally, and music_assets/common/tables.py
-- derives each DataFrame's Polars schema from these statements, so the schema files are the one
-- definition of the columns. music_assets/common/tables.py runs them all, in stage order.
CREATE SCHEMA IF NOT EXISTS music;

-- Rewards a checkpoint gives to evaluation pairs: held-out seed and MUSIC test pairs, and the
-- pairs of registered evaluation sets. One row per (variant, eval_set, item).
CREATE TABLE IF NOT EXISTS music.rm_scores (
    variant    VARCHAR NOT NULL,
    checkpoint VARCHAR NOT NULL,
    eval_set   VARCHAR NOT NULL,   -- 'heldout_seed', 'heldout_music', or a registered eval set
    item_id    VARCHAR NOT NULL,
    subset     VARCHAR,
    user_turns INTEGER NOT NULL,
    r_chosen   DOUBLE NOT NULL,
    r_rejected DOUBLE NOT NULL,
    scored_by  VARCHAR             -- prefix_packed | prefix_cached | full (same rewards; which ran)
);
-- Warehouses created before the scoring paths were recorded.
ALTER TABLE music.rm_scores ADD COLUMN IF NOT EXISTS scored_by VARCHAR;

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
-- outcome is from MUSIC's side; NULL when either conversation was dropped (drop_reason says why) or
-- when the judge could not judge the pair (reason: judge_error | judge_truncated | unparsed).
CREATE TABLE IF NOT EXISTS music.bon_judgments (
    run_key         VARCHAR NOT NULL,
    source          VARCHAR NOT NULL,
    context_id      VARCHAR NOT NULL,
    n               INTEGER NOT NULL,
    outcome         VARCHAR,        -- 'win' | 'tie' | 'loss'
    -- decided: consistent | judge_tie | inconsistent | identical; errors: judge_error | judge_truncated | unparsed
    reason          VARCHAR,
    verdict_forward VARCHAR,        -- baseline shown as A: 'A' | 'B' | 'C' | NULL (no verdict)
    verdict_swapped VARCHAR,        -- MUSIC shown as A
    raw_forward     VARCHAR,        -- the judge's answer, or the engine's refusal (judge_error)
    raw_swapped     VARCHAR,
    drop_reason     VARCHAR
);

-- The judge's order-swapped preference on evaluation pairs (chosen shown first, then swapped),
-- to measure how often each reward model agrees with the judge. preferred is NULL when the judge
-- could not judge the pair (reason: judge_error | judge_truncated | unparsed, as in bon_judgments).
CREATE TABLE IF NOT EXISTS music.judge_verdicts (
    eval_set        VARCHAR NOT NULL,
    item_id         VARCHAR NOT NULL,
    preferred       VARCHAR,            -- 'chosen' | 'rejected' | 'tie' | NULL (judge error)
    reason          VARCHAR NOT NULL,
    verdict_forward VARCHAR,
    verdict_swapped VARCHAR,
    raw_forward     VARCHAR NOT NULL,
    raw_swapped     VARCHAR NOT NULL
);
-- Warehouses created before judge errors existed: preferred was NOT NULL there.
ALTER TABLE music.judge_verdicts ALTER COLUMN preferred DROP NOT NULL;
