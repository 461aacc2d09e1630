"""best_of_n and judge_agreement: the evaluation that needs generation and a judge.

`best_of_n` continues every evaluation context under the baseline and the MUSIC reward model for
each N (music_assets/evaluation/best_of_n.py), and the judge compares the two final conversations in both
orders. `judge_agreement` asks the same judge about evaluation pairs, to see how often each reward
model's preference matches it. Results go to music.bon_conversations, music.bon_judgments and
music.judge_verdicts; evaluation_report turns them into win rates with bootstrap intervals.
"""

import json
from collections import Counter

import polars as pl
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset
from dagster_duckdb import DuckDBResource

from music_assets.evaluation.best_of_n import EvalContext, judge_best_of_n, run_best_of_n
from music_assets.evaluation.scorers import conversation_scorer
from music_assets.common.hashing import seeded_sample, stable_hash
from music_assets.evaluation.judge import DECIDED_REASONS, ERROR_REASONS, judge_pairs
from music_assets.common.metadata import render_conversation, table_metadata
from music_assets.simulation.prompts import PACKAGED, Prompts
from music_assets.evaluation.scoring import win_rate
from music_assets.common.tables import frame, replace_rows, sql
from resources.checkpoints import CheckpointStore
from resources.compute import ComputeResource
from resources.stage_config import EvaluationResource, SimulationResource
from resources.llm import LLMEngine

def best_of_n_code_version(prompts: Prompts) -> str:
    """The code version of `best_of_n` and `judge_agreement` under a set of prompt templates (the
    decorated assets have the packaged ones'; the Definitions use the configured `prompts_dir`'s)."""
    return f"bon-{prompts.judge_version}"
FIRST, SECOND = "baseline", "music"  # outcomes are reported from MUSIC's side


def sample_ids(ids: list[str], limit: int | None, seed: int) -> set[str]:
    """A seeded, order-independent sample: the `limit` ids that rank first under `hash_rank`."""
    return set(seeded_sample(ids, limit, seed))


def eval_contexts(rows: list[dict], limit: int | None, seed: int,
                  limits: dict[str, int] | None = None) -> list[EvalContext]:
    """Best-of-N starting points from sql/bon_contexts.sql rows, a seeded sample of `limit` per
    source (`limits` sets a named source's own). A held-out seed conversation loses its last
    answer (Best-of-N writes it); a prompt-only set (MT-Bench, HH, UltraInteract) starts from its
    first user turn and keeps the later ones as the user's scripted next messages."""
    limits = limits or {}
    sources = sorted({r["source"] for r in rows})
    unknown = sorted(set(limits) - set(sources) - {"heldout_seed"})
    if unknown:  # a misspelt set would silently get `limit` instead
        raise ValueError(f"evaluation.max_contexts names {', '.join(unknown)}, which is no Best-of-N source "
                         f"(sources: {', '.join(sorted({'heldout_seed', *sources}))}; a set needs prompt-only items)")
    contexts = []
    for source in sources:
        mine = [r for r in rows if r["source"] == source]
        keep = sample_ids([r["context_id"] for r in mine], limits.get(source, limit), seed)
        for r in mine:
            if r["context_id"] not in keep:
                continue
            msgs = [dict(m) for m in r["messages"]]
            if all(m["role"] == "user" for m in msgs):  # prompt-only rows: the user turns
                contexts.append(EvalContext(r["context_id"], source, msgs[:1], tuple(m["content"] for m in msgs[1:])))
            elif msgs[-1]["role"] == "assistant" and len(msgs) >= 2:
                contexts.append(EvalContext(r["context_id"], source, msgs[:-1]))
    return contexts


@asset(deps=["reward_model", "training_splits", "eval_items"], code_version=best_of_n_code_version(PACKAGED),
       group_name="evaluation")
def best_of_n(context: AssetExecutionContext, evaluation: EvaluationResource, simulation: SimulationResource,
              checkpoints: CheckpointStore, compute: ComputeResource, policy: LLMEngine, user_simulator: LLMEngine,
              judge: LLMEngine, duckdb: DuckDBResource) -> MaterializeResult:
    """Multi-turn Best-of-N for N in `evaluation.best_of_n`: each reward model picks among the
    policy's N candidates at every turn; the judge compares baseline and MUSIC conversations in
    both orders. Win/tie/loss per N with a bootstrap interval over the pairs the judge decided, and
    the judge's errors by reason beside them (see `bon_summary`)."""
    settings = evaluation.settings()
    prompts = simulation.settings().prompts()  # the user simulator's and the judge's templates
    folders = {v: str(checkpoints.local_copy(v)) for v in (FIRST, SECOND)}
    with duckdb.get_connection() as con:
        rows = con.execute(sql("evaluation/bon_contexts")).pl().to_dicts()
    contexts = eval_contexts(rows, settings.contexts_per_source, settings.seed, settings.max_contexts)
    if not contexts:
        raise ValueError("no Best-of-N contexts: no held-out seed test conversations and no prompt-only evaluation set")
    run_key = stable_hash({"settings": settings.run_settings(), "checkpoints": folders, "prompts": prompts.judge_version,
                           "engines": [e.identity() for e in (policy, user_simulator, judge)]})
    context.log.info(f"best-of-n: {len(contexts)} contexts x N {settings.best_of_n} x 2 reward models")
    scorers = {v: conversation_scorer(f, compute.device, compute.attn_implementation) for v, f in folders.items()}
    runs, stats = run_best_of_n(contexts, scorers, policy, user_simulator, settings, log=context.log.info,
                                prompts=prompts)
    judgments = judge_best_of_n(runs, judge, settings, FIRST, SECOND, prompts)

    conversations = frame("bon_conversations", [
        {"run_key": run_key, "source": r.ctx.source, "context_id": r.ctx.context_id, "n": r.n, "variant": r.variant,
         "checkpoint": folders[r.variant], "messages": r.messages, "picks": json.dumps(r.picks), "drop_reason": r.dropped}
        for r in runs])
    verdicts = frame("bon_judgments", [{"run_key": run_key, **j} for j in judgments])
    with duckdb.get_connection() as con:
        replace_rows(con, {"bon_conversations": conversations, "bon_judgments": verdicts})

    summary = bon_summary(verdicts, settings.bootstrap_samples, settings.seed)
    return MaterializeResult(
        data_version=DataVersion(stable_hash([run_key, verdicts["outcome"].to_list(), verdicts["reason"].to_list()])),
        metadata={
            **table_metadata(verdicts, verdicts.select("source", "context_id", "n", "outcome", "reason", "drop_reason")),
            "run_key": run_key, "judge_prompt_version": prompts.judge_version,
            "settings": MetadataValue.json(settings.run_settings()),
            "checkpoints": MetadataValue.json(folders),
            "win_rate_by_n": MetadataValue.json(summary),
            "judge_errors": MetadataValue.json({r: sum(s["judge_errors"][r] for s in summary.values())
                                                for r in ERROR_REASONS}),
            "contexts": len(contexts),
            "contexts_by_source": MetadataValue.json(dict(Counter(c.ctx.source for c in runs if c.variant == FIRST and c.n == settings.best_of_n[0]))),
            "policy_tokens_generated": stats.completion_tokens,
            # candidates scored with their conversation's prefix run once, and whole (same rewards)
            "scoring_paths": MetadataValue.json({v: dict(s.paths) for v, s in scorers.items()}),
            "engine_requests": stats.requests,
            "example": MetadataValue.md(_example(runs)),
        },
    )


def bon_summary(verdicts: pl.DataFrame, samples: int, seed: int) -> dict:
    """Per N: MUSIC's wins/ties/losses against the baseline, its win rate with a bootstrap 95%
    interval, the judge's errors by reason and the contexts dropped (by reason).

    The rule: wins, ties, losses, `n` and the win rate ((wins + ties/2) / n) count only the pairs the
    judge *decided*: consistent verdicts, its own ties, inconsistent orders (a tie) and identical
    conversations (a tie without asking). Judge errors (`judge_error`: the engine refused the prompt;
    `judge_truncated`: the answer was cut before its verdict; `unparsed`: no verdict) are left out of
    the rate and counted beside it, as are dropped contexts: a judge that fails shows as errors, not
    as a win rate pulled towards 0.5. `error_share` is errors over the pairs sent to the judge."""
    out = {}
    for (n,), part in verdicts.sort("n").group_by("n", maintain_order=True):
        reasons = Counter(part.filter(pl.col("drop_reason").is_null())["reason"].to_list())
        decided = part.filter(pl.col("reason").is_in(list(DECIDED_REASONS)))
        errors = {r: reasons.get(r, 0) for r in ERROR_REASONS}
        asked = decided.height - reasons.get("identical", 0) + sum(errors.values())
        out[str(n)] = {**win_rate(decided["outcome"].to_list(), samples, seed).as_dict(),
                       "judge_errors": errors, "errors": sum(errors.values()), "asked": asked,
                       "error_share": round(sum(errors.values()) / asked, 4) if asked else 0.0,
                       "reasons": dict(reasons),
                       "dropped": dict(Counter(part.filter(pl.col("drop_reason").is_not_null())["drop_reason"].to_list()))}
    return out


def _example(runs) -> str:
    for r in runs:
        if r.dropped is None and r.variant == SECOND:
            start = len(r.ctx.messages) - 1
            return f"### {r.ctx.context_id} (N={r.n}, {r.variant})\n\n{render_conversation(r.messages[start:])}"
    return "_no finished conversation_"


@asset(deps=["rm_evaluation"], code_version=best_of_n_code_version(PACKAGED), group_name="evaluation")
def judge_agreement(context: AssetExecutionContext, evaluation: EvaluationResource, simulation: SimulationResource,
                    judge: LLMEngine, duckdb: DuckDBResource) -> MaterializeResult:
    """The judge's order-swapped preference on up to `evaluation.agreement_pairs` pairs per
    evaluation set, and how often each reward model's preference agrees with it, on the pairs the
    judge decided; pairs it could not judge are counted by error reason, not taken as ties."""
    settings = evaluation.settings()
    with duckdb.get_connection() as con:
        rows = con.execute(sql("evaluation/evaluation_rows")).pl().to_dicts()
    picked = []
    for eval_set in sorted({r["eval_set"] for r in rows}):
        mine = [r for r in rows if r["eval_set"] == eval_set]
        keep = sample_ids([r["item_id"] for r in mine], settings.agreement_pairs, settings.seed)
        picked += [r for r in mine if r["item_id"] in keep]
    judgments = judge_pairs(judge, [([dict(m) for m in r["chosen"]], [dict(m) for m in r["rejected"]]) for r in picked],
                            settings.judge_sampling, [int(stable_hash([settings.seed, r["item_id"]])[:8], 16) for r in picked],
                            simulation.settings().prompts())
    verdicts = frame("judge_verdicts", [
        {"eval_set": r["eval_set"], "item_id": r["item_id"],
         "preferred": {"first": "chosen", "second": "rejected", "tie": "tie", None: None}[j.preferred],
         "reason": j.reason,
         "verdict_forward": j.verdict_forward, "verdict_swapped": j.verdict_swapped,
         "raw_forward": j.raw_forward, "raw_swapped": j.raw_swapped} for r, j in zip(picked, judgments)])
    with duckdb.get_connection() as con:
        replace_rows(con, {"judge_verdicts": verdicts})
        agreement = con.execute(sql("evaluation/judge_agreement")).pl()
    errors = Counter(j.reason for j in judgments if j.error)
    asked = sum(j.reason != "identical" for j in judgments)
    return MaterializeResult(
        data_version=DataVersion(stable_hash([verdicts["item_id"].to_list(), verdicts["preferred"].to_list()])),
        metadata={
            **table_metadata(verdicts, verdicts.select("eval_set", "item_id", "preferred", "reason")),
            "agreement": MetadataValue.md(agreement_markdown(agreement)),
            "reasons": MetadataValue.json(dict(Counter(verdicts["reason"].to_list()))),
            "judge_errors": MetadataValue.json({r: errors.get(r, 0) for r in ERROR_REASONS}),
            "judge_error_share": round(sum(errors.values()) / asked, 4) if asked else 0.0,
        },
    )


def agreement_markdown(agreement: pl.DataFrame) -> str:
    if agreement.height == 0:
        return "_The judge decided no pair (all ties or judge errors), so agreement cannot be measured._"
    lines = ["| evaluation set | reward model | pairs the judge decided | agreement with judge | judge agrees with label |",
             "| --- | --- | --- | --- | --- |"]
    for r in agreement.iter_rows(named=True):
        lines.append(f"| {r['eval_set']} | {r['variant']} | {r['n']} | {r['agree'] / r['n']:.3f} | "
                     f"{r['judge_prefers_chosen'] / r['n']:.3f} |")
    return "\n".join(lines)
