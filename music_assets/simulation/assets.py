"""Assets of the MUSIC simulation: seed_contexts -> simulated_branches -> music_pairs.

`simulated_branches` commits each finished turn to DuckDB as it is produced (through
`DuckDBTurnStore`, not the IO manager), so it can resume after a crash; `music_pairs` then
assembles whole conversations from those rows. Both are partitioned like the seeds.
"""

import json
from collections import Counter

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from dagster_duckdb import DuckDBResource

from music_assets.simulation.contexts import choose_contexts
from music_assets.common.hashing import stable_hash
from music_assets.common.metadata import render_conversation, table_metadata
from music_assets.simulation.pairs import assemble_pairs, assistant_turns_differing
from music_assets.common.partitions import seed_partitions
from music_assets.seeds.shards import split_partition_key
from music_assets.simulation.prompts import PACKAGED, Prompts
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import generation_key, simulate
from music_assets.simulation.state import Context, TurnStore
from music_assets.simulation.validators import shows_private_note, shows_private_rewrite
from music_assets.common.tables import frame, sql
from resources.llm import LLMEngine
from resources.stage_config import SimulationResource

CONTEXTS_VERSION = "contexts-v2"  # v2: max_contexts samples by a seeded hash of pair_id, not the first N rows


def simulation_code_version(prompts: Prompts) -> str:
    """`simulated_branches`' code version under a set of prompt templates (the decorated asset has
    the packaged ones'; the Definitions override it with the configured `prompts_dir`'s)."""
    return f"simulation-{prompts.version}"


PAIRS_VERSION = "pairs-v1"
EXAMPLE_PAIRS = 2


@asset(
    ins={"seed_conversations": AssetIn()},
    partitions_def=seed_partitions,
    metadata={"partition_expr": "source"},
    code_version=CONTEXTS_VERSION,
    group_name="simulation",
    pool="duckdb_writers",
)
def seed_contexts(
    context: AssetExecutionContext, seed_conversations: pl.DataFrame, simulation: SimulationResource
) -> Output[pl.DataFrame]:
    """Conversation prefixes (first k exchanges of each seed pair's chosen side) to simulate from;
    with `max_contexts`, a seeded sample of the pairs (see `choose_contexts`). `max_contexts` is per
    source: a shard samples its part (`Shard.quota`) of its own pairs, as it cannot see the others."""
    cfg = simulation.settings()
    shard = split_partition_key(context.partition_key)[1]
    limit = shard.quota(cfg.max_contexts) if shard is not None and cfg.max_contexts is not None else cfg.max_contexts
    pairs = seed_conversations.filter(pl.col("kind") == "pair")
    rows, skipped = choose_contexts(pairs.to_dicts(), cfg.min_context_exchanges, cfg.max_context_exchanges, cfg.seed,
                                    limit)
    df = frame("seed_contexts", rows)
    return Output(
        df,
        data_version=DataVersion(stable_hash(df["context_id"].to_list())),
        metadata={
            **table_metadata(df, df.select("context_id", "pair_id", "k")),
            "k_histogram": MetadataValue.json({str(k): n for k, n in sorted(Counter(df["k"].to_list()).items())}),
            "skipped_too_short": skipped,
        },
    )


def simulation_yield(stats, table: pl.DataFrame) -> dict:
    """How much of the work became MUSIC pairs: contexts finished of those attempted, generated
    tokens per finished pair (everything this run generated, retries, continuations and dropped
    contexts included; only when the run generated the whole partition, as a resumed run spent
    part of the tokens earlier), and how the kept messages ended (`on_length`)."""
    finishes = Counter(table["user_finish"].to_list() + table["assistant_finish"].to_list()) if table.height else {}
    whole_run = stats.resumed_turns == 0 and stats.completed
    return {"finished": stats.completed, "attempted": stats.contexts,
            "share": round(stats.completed / stats.contexts, 3) if stats.contexts else None,
            "tokens_per_music_pair": round(stats.completion_tokens / stats.completed) if whole_run else None,
            "messages_by_finish": dict(finishes), "continuations": stats.continuations, "trimmed": stats.trimmed}


class DuckDBTurnStore(TurnStore):
    """Commits turns through short-lived connections, so no DuckDB lock is held while generating."""

    def __init__(self, duckdb: DuckDBResource, source: str, gkey: str):
        self.duckdb, self.source, self.gkey = duckdb, source, gkey

    def load(self):
        params = {"source": self.source, "generation_key": self.gkey}
        with self.duckdb.get_connection() as con:
            rows = con.execute(sql("simulation/simulation_committed"), params).pl().to_dicts()
            drops = con.execute(sql("simulation/simulation_dropped"), params).pl().to_dicts()
        return rows, drops

    def commit(self, rows, drops):
        with self.duckdb.get_connection() as con:
            con.execute("BEGIN TRANSACTION")
            if rows:
                con.register("new_turns", pl.DataFrame(rows))
                con.execute(sql("simulation/simulation_insert_turns"))
            if drops:
                con.register("new_drops", pl.DataFrame(drops))
                con.execute(sql("simulation/simulation_insert_drops"))
            con.execute("COMMIT")


@asset(
    deps=["seed_contexts"],
    partitions_def=seed_partitions,
    code_version=simulation_code_version(PACKAGED),
    group_name="simulation",
    check_specs=[AssetCheckSpec("some_contexts_completed", asset="simulated_branches", blocking=True)],
)
def simulated_branches(
    context: AssetExecutionContext,
    simulation: SimulationResource,
    user_simulator: LLMEngine,
    assistant: LLMEngine,
    rewriter: LLMEngine,
    duckdb: DuckDBResource,
):
    """Chosen and rejected continuations of every seed context, one row per finished turn."""
    source = context.partition_key
    settings = simulation.settings()
    prompts = settings.prompts()
    engines = Engines(user=user_simulator, assistant=assistant, rewriter=rewriter)
    gkey = generation_key(settings, engines, prompts)
    with duckdb.get_connection() as con:
        contexts = con.execute(sql("simulation/seed_contexts_for_source"), {"source": source}).pl()
    ctx_objs = [Context(r["context_id"], r["source"], r["messages"]) for r in contexts.iter_rows(named=True)]
    store = DuckDBTurnStore(duckdb, source, gkey)
    stats = simulate(ctx_objs, engines, settings, store, log=context.log.info, prompts=prompts)

    models, settings_json = json.dumps(engines.identity(), sort_keys=True), json.dumps(settings.generation_settings(), sort_keys=True)
    with duckdb.get_connection() as con:
        con.execute(
            sql("simulation/simulation_record_run"),
            {"source": source, "generation_key": gkey, "prompt_version": prompts.version,
             "models": models, "settings": settings_json},
        )
        table = con.execute(sql("simulation/simulation_turns_of_run"), {"source": source, "generation_key": gkey}).pl()
    turns = table.height
    yield MaterializeResult(
        data_version=DataVersion(f"{gkey}:{stats.completed}:{turns}"),
        metadata={
            **table_metadata(table, table.select("context_id", "branch", "turn", "user_message", "assistant_message")),
            "generation_key": gkey,
            "prompt_version": prompts.version,
            "models": MetadataValue.json(engines.identity()),
            "settings": MetadataValue.json(settings.generation_settings()),
            "contexts": stats.contexts,
            "contexts_completed": stats.completed,
            "yield": MetadataValue.json(simulation_yield(stats, table)),
            "contexts_dropped": MetadataValue.json(dict(stats.dropped)),
            "retries": MetadataValue.json(dict(stats.retries)),
            "turns_resumed": stats.resumed_turns,
            "turn_rows_committed_this_run": stats.committed_rows,
            "engine_calls": stats.calls,
            "engine_requests": stats.requests,
            "tokens_generated": stats.completion_tokens,
            "tokens_per_second": round(stats.tokens_per_second, 1),
        },
    )
    yield AssetCheckResult(
        check_name="some_contexts_completed",
        passed=stats.completed > 0 or stats.contexts == 0,
        description=f"{stats.completed} of {stats.contexts} contexts completed all turns",
        metadata={"dropped": MetadataValue.json(dict(stats.dropped))},
    )


@asset(
    ins={"seed_contexts": AssetIn()},
    deps=["simulated_branches"],
    partitions_def=seed_partitions,
    metadata={"partition_expr": "source"},
    code_version=PAIRS_VERSION,
    group_name="simulation",
    pool="duckdb_writers",
    check_specs=[
        AssetCheckSpec("rejected_differs_in_two_turns", asset="music_pairs", blocking=True),
        AssetCheckSpec("private_instruction_not_visible", asset="music_pairs", blocking=True),
        AssetCheckSpec("no_empty_messages", asset="music_pairs", blocking=True),
    ],
)
def music_pairs(context: AssetExecutionContext, seed_contexts: pl.DataFrame, simulation: SimulationResource,
                duckdb: DuckDBResource):
    """One row per MUSIC pair: full chosen and rejected conversations with contrast metadata."""
    with duckdb.get_connection() as con:
        rows = con.execute(sql("simulation/simulation_rows_for_pairs"), {"source": context.partition_key}).pl().to_dicts()
    settings = simulation.settings()
    pairs = assemble_pairs(seed_contexts.to_dicts(), rows, settings.turns)
    df = frame("music_pairs", pairs)

    min_differing = settings.min_differing_turns()
    markers = settings.prompts().private_note_markers
    differing = [assistant_turns_differing(p) for p in pairs]
    leaks = [p["pair_id"] for p in pairs if _leaks_private_instruction(p, markers)]
    empties = [p["pair_id"] for p in pairs if any(not m["content"].strip() for m in p["chosen"] + p["rejected"])]
    yield Output(
        df,
        data_version=DataVersion(stable_hash(sorted(df["content_hash"].to_list()))),
        metadata={
            **table_metadata(df, df.select("pair_id", "k", "contrast_turn", "original_instruction", "modified_instruction")),
            "contrast_turn_histogram": MetadataValue.json(
                {str(k): n for k, n in sorted(Counter(df["contrast_turn"].to_list()).items())}
            ),
            "examples": MetadataValue.md(_examples(pairs)),
        },
    )
    too_similar = [p["pair_id"] for p, d in zip(pairs, differing) if d < min_differing]
    yield AssetCheckResult(
        check_name="rejected_differs_in_two_turns",
        passed=not too_similar,
        description=(f"{len(too_similar)} pairs differ in fewer than {min_differing} assistant turns from c "
                     f"(min_contrast_turns: the rejected branch is flawed in every turn from c to T, and "
                     f"c <= T - min_contrast_turns + 1)"),
        metadata={"pair_ids": MetadataValue.json(too_similar[:20])},
    )
    yield AssetCheckResult(
        check_name="private_instruction_not_visible",
        passed=not leaks,
        description=f"{len(leaks)} pairs show the private instruction in the visible transcript",
        metadata={"pair_ids": MetadataValue.json(leaks[:20])},
    )
    yield AssetCheckResult(
        check_name="no_empty_messages",
        passed=not empties,
        description=f"{len(empties)} pairs contain an empty message",
        metadata={"pair_ids": MetadataValue.json(empties[:20])},
    )


def _leaks_private_instruction(pair: dict, markers: tuple[str, ...]) -> bool:
    """The rejected transcript from c on must never show the contrastive note (any of the active
    template's `markers`, in an answer), nor
    the modified request in a simulated user turn (where the user goes on from the original
    request). The seed prefix and the turn-c request are the original's words: not searched."""
    for m in pair["rejected"][pair["prefix_messages"]:]:
        if shows_private_note(m["content"], markers) or (m["role"] == "user" and shows_private_rewrite(
                m["content"], pair["modified_instruction"], pair["original_instruction"])):
            return True
    return False


def _examples(pairs: list[dict]) -> str:
    blocks = []
    for p in pairs[:EXAMPLE_PAIRS]:
        start = p["prefix_messages"]
        blocks.append(
            f"### {p['pair_id']} (k={p['k']}, c={p['contrast_turn']})\n\n"
            f"**original request:** {p['original_instruction']}\n\n**private rewrite:** {p['modified_instruction']}\n\n"
            f"**chosen from c**\n\n{render_conversation(p['chosen'][start:])}\n\n"
            f"**rejected from c**\n\n{render_conversation(p['rejected'][start:])}"
        )
    return "\n\n---\n\n".join(blocks) or "_no pairs_"
