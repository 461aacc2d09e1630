"""rm_evaluation (per variant) -> evaluation_report: "is the MUSIC reward model better on multi-turn
conversations, without losing single-turn quality?", answered with sample sizes and tests."""

import base64
import math
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset
from dagster_duckdb import DuckDBResource

from music_assets.evaluation.best_of_n_assets import agreement_markdown, bon_summary
from music_assets.evaluation.judge import ERROR_REASONS
from music_assets.evaluation.scorers import load_checkpoint, score_rows
from music_assets.common.hashing import stable_hash
from music_assets.common.metadata import table_metadata
from music_assets.common.plots import figure
from music_assets.training.assets import reward_variants
from music_assets.evaluation.scoring import pairwise_accuracy, rewardbench_scores, rewardbench_spec, section_of
from music_assets.common.tables import sql
from resources.checkpoints import CheckpointStore
from resources.compute import ComputeResource
from resources.stage_config import CurationResource, EvaluationResource

EVALUATION_VERSION = "rm-eval-v3"  # v3: rm_scores.scored_by, the report names the scoring path
SMALL_SAMPLE = 30  # below this many items the report says its figures are mechanics, not evidence


@asset(partitions_def=reward_variants, deps=["reward_model", "training_splits", "eval_items"],
       code_version=EVALUATION_VERSION, group_name="evaluation", pool="duckdb_writers")
def rm_evaluation(context: AssetExecutionContext, checkpoints: CheckpointStore, data: CurationResource,
                  compute: ComputeResource, duckdb: DuckDBResource) -> MaterializeResult:
    """Rewards of this variant's latest checkpoint on held-out seed and MUSIC pairs and on every
    registered evaluation set; pairwise accuracy with 95% intervals and ties. A RewardBench set's
    pair in a subset RewardBench does not define is scored too, and counted in `unknown_subsets`."""
    variant = context.partition_key
    folder = str(checkpoints.local_copy(variant))  # a URL's checkpoint: its cached local copy
    model, tok, encoder = load_checkpoint(folder, compute.device, compute.attn_implementation)
    rewardbench_sets = {name for name, spec in data.settings().eval_sets.items() if spec.rewardbench}
    with duckdb.get_connection() as con:
        rows = con.execute(sql("evaluation/evaluation_rows")).pl().to_dicts()
    scored, skipped, paths = score_rows(model, tok, encoder, rows)
    frame = pl.DataFrame(scored, schema={"eval_set": pl.String, "item_id": pl.String, "subset": pl.String,
                                         "user_turns": pl.Int32, "r_chosen": pl.Float64, "r_rejected": pl.Float64,
                                         "scored_by": pl.String})
    frame = frame.with_columns(variant=pl.lit(variant), checkpoint=pl.lit(folder))
    with duckdb.get_connection() as con:
        con.register("new_scores", frame)
        con.execute("BEGIN TRANSACTION")
        con.execute(sql("evaluation/rm_scores_replace"), {"variant": variant})
        con.execute("INSERT INTO music.rm_scores BY NAME SELECT * FROM new_scores")
        con.execute("COMMIT")
    unknown = Counter(f"{r['eval_set']}/{r['subset']}" for r in scored
                      if r["eval_set"] in rewardbench_sets and section_of(r["subset"] or "") is None)
    summary = {name: pairwise_accuracy(list(zip(g["r_chosen"], g["r_rejected"]))).as_dict()
               for (name,), g in frame.group_by("eval_set", maintain_order=True)}
    return MaterializeResult(
        data_version=DataVersion(stable_hash([folder, frame.height, round(float(frame["r_chosen"].sum()), 6) if frame.height else 0])),
        metadata={**table_metadata(frame, frame.select("eval_set", "item_id", "user_turns", "r_chosen", "r_rejected")),
                  "checkpoint": MetadataValue.path(folder),
                  "accuracy": MetadataValue.json(summary), "skipped": MetadataValue.json(dict(skipped)),
                  # sequences scored with their pair's shared prefix run once, and whole (same rewards)
                  "scoring_paths": MetadataValue.json(dict(paths)),
                  # pairs cut to the checkpoint's max length (difference_truncated: only their last tokens fit)
                  "truncation": MetadataValue.json(encoder.stats.as_dict()),
                  # RewardBench-set pairs in subsets RewardBench does not define: scored, in no section
                  "unknown_subsets": MetadataValue.json(dict(unknown))},
    )


@asset(deps=["rm_evaluation", "best_of_n", "judge_agreement"], code_version=EVALUATION_VERSION, group_name="evaluation")
def evaluation_report(context: AssetExecutionContext, data: CurationResource, evaluation: EvaluationResource,
                      duckdb: DuckDBResource) -> MaterializeResult:
    """Baseline vs MUSIC: accuracy per evaluation set (with 95% intervals and a paired exact
    McNemar test), accuracy by number of user turns, RewardBench sections where available,
    multi-turn Best-of-N win rates by N and judge agreement.
    Written to <exports_dir>/../reports/evaluation_report.md with its PNG plots."""
    with duckdb.get_connection() as con:
        scores = con.execute("SELECT * FROM music.rm_scores").pl()
        judgments = con.execute("SELECT * FROM music.bon_judgments").pl()
        agreement = con.execute(sql("evaluation/judge_agreement")).pl()
        judged_pairs = dict(con.execute("SELECT reason, count(*) FROM music.judge_verdicts GROUP BY reason").fetchall())
    out_dir = Path(data.settings().exports_dir).parent / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    rewardbench_sets = {name for name, spec in data.settings().eval_sets.items() if spec.rewardbench}
    report, plots = build_report(scores, out_dir, rewardbench_sets)
    settings = evaluation.settings()
    bon_text, bon_plots = best_of_n_section(judgments, agreement, judged_pairs, out_dir,
                                            settings.bootstrap_samples, settings.seed)
    report, plots = report + bon_text, plots + bon_plots
    (out_dir / "evaluation_report.md").write_text(report)
    inline = report
    for name in plots:
        encoded = base64.b64encode((out_dir / name).read_bytes()).decode()
        inline = inline.replace(f"]({name})", f"](data:image/png;base64,{encoded})")
    return MaterializeResult(
        data_version=DataVersion(stable_hash(report)),
        metadata={"dagster/row_count": scores.height + judgments.height,  # the scores and judgments it summarizes
                  "report": MetadataValue.md(inline), "path": MetadataValue.path(str(out_dir / "evaluation_report.md")),
                  "variants": MetadataValue.json(sorted(set(scores["variant"].to_list())))},
    )


def _paths(part: pl.DataFrame) -> str:
    """Pairs per scoring path in a set's rows (all variants), e.g. 'prefix_packed 120, full 3'."""
    if "scored_by" not in part.columns:
        return "-"
    counts = Counter(p or "unrecorded" for p in part["scored_by"].to_list())
    return ", ".join(f"{path} {n}" for path, n in counts.most_common())


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test on discordant pairs (b: only A right, c: only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def build_report(scores: pl.DataFrame, out_dir: Path, rewardbench_sets: Collection[str] = ()) -> tuple[str, list[str]]:
    """The report's text and plot file names. Only the sets named in `rewardbench_sets` (registered
    with `rewardbench: true`) get RewardBench sections; another set's `subset` column is just data."""
    variants = [v for v in ("baseline", "music") if v in set(scores["variant"].to_list())]
    lines = ["# Reward-model evaluation: baseline (D) vs MUSIC (D + D_MUSIC)", ""]
    if not variants:
        return "\n".join(lines + ["_No scores yet: materialize rm_evaluation._"]), []
    largest = scores.group_by("variant", "eval_set").len()["len"].max()
    if largest < SMALL_SAMPLE:
        lines += [f"**Tiny sample (the largest evaluation set has {largest} pairs): these figures show the pipeline's "
                  "mechanics, not model quality.**", ""]
    lines += ["Accuracy = share of pairs whose chosen side gets the higher reward (ties count as wrong and are",
              "listed); 95% Wilson intervals; p = exact McNemar test on the pairs both models scored.", "",
              "Scored by: the path that computed the rewards (all give the same rewards; prefix_packed and",
              "prefix_cached run a pair's shared prefix once, full runs each side whole), pairs per path.", "",
              "| evaluation set | n | " + " | ".join(f"{v} accuracy [95% CI] (ties)" for v in variants)
              + " | difference | p | verdict | scored by |",
              "| --- | --- |" + " --- |" * len(variants) + " --- | --- | --- | --- |"]
    correct = scores.with_columns(correct=pl.col("r_chosen") > pl.col("r_rejected"))
    for (name,), part in correct.group_by("eval_set", maintain_order=True):
        cells, accs = [], {}
        for v in variants:
            a = pairwise_accuracy(list(zip(*[part.filter(pl.col("variant") == v)[c] for c in ("r_chosen", "r_rejected")])))
            accs[v] = a
            cells.append(f"{a.value:.3f} [{a.low:.3f}, {a.high:.3f}] ({a.ties})")
        diff = p = verdict = "-"
        if len(variants) == 2:
            paired = part.pivot(on="variant", index="item_id", values="correct").drop_nulls()
            b = int((paired["baseline"] & ~paired["music"]).sum())
            c = int((~paired["baseline"] & paired["music"]).sum())
            p_value = mcnemar_p(b, c)
            diff = f"{accs['music'].value - accs['baseline'].value:+.3f}"
            p = f"{p_value:.3g}"
            verdict = "significant" if p_value < 0.05 else "not significant"
        lines.append(f"| {name} | {part.height // len(variants)} | " + " | ".join(cells)
                     + f" | {diff} | {p} | {verdict} | {_paths(part)} |")

    plots = [_plot_by_turns(correct, variants, out_dir / "accuracy_by_turns.png")]
    lines += ["", "## Accuracy by number of user turns", "", f"![accuracy by turns]({plots[0]})", ""]
    lines += ["## RewardBench-style sections", ""]
    rb = correct.filter(pl.col("eval_set").is_in(sorted(rewardbench_sets)) & pl.col("subset").is_not_null())
    for (name,), part in rb.group_by("eval_set", maintain_order=True):
        text, plot = _rewardbench_section(name, part, variants, out_dir)
        lines += text
        plots.append(plot)
    if not rb.height:
        lines += ["_No RewardBench-format evaluation set is registered (`eval_sets: {name: {path or hf_dataset, "
                  "rewardbench: true}}`)._", ""]
    lines += ["The paper's table (RewardBench), the layout this section follows:", "",
              "| model | Chat | Chat Hard | Safety | Reasoning | Average |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rewardbench_spec()["paper_reference"].items():
        lines.append(f"| {name} | " + " | ".join(str(row[k]) for k in ("Chat", "Chat Hard", "Safety", "Reasoning", "Average")) + " |")
    return "\n".join(lines) + "\n", [p.name if isinstance(p, Path) else p for p in plots]


def _rewardbench_section(name: str, part: pl.DataFrame, variants: list[str], out_dir: Path) -> tuple[list[str], str]:
    """One RewardBench set's section scores and its per-subset rows; a subset RewardBench does not
    define gets its own row, counted, and no section."""
    rows, sizes = {}, {}
    for v in variants:
        by = part.filter(pl.col("variant") == v).group_by("subset").agg(pl.col("correct").sum(), pl.len())
        sizes[v] = {s: int(n) for s, _, n in by.iter_rows()}
        rows[v] = rewardbench_scores({s: (int(c), int(n)) for s, c, n in by.iter_rows()})
    sections = list(rewardbench_spec()["sections"])
    lines = [f"### {name}", "", "| model | " + " | ".join(sections) + " | Average |", "|" + " --- |" * (len(sections) + 2)]
    for v, r in rows.items():
        lines.append(f"| {v} | " + " | ".join(f"{100 * r['sections'][s]:.1f}" if s in r["sections"] else "-" for s in sections)
                     + f" | {100 * r['average']:.1f} |")
    plot = _plot_sections(rows, sections, out_dir / f"sections_{name}.png")
    unknown = sorted({s for r in rows.values() for s in r["unknown_subsets"]})
    lines += ["", f"![sections]({plot})", "", "| subset | section | n | " + " | ".join(f"{v} accuracy" for v in variants) + " |",
              "| --- | --- | --- |" + " --- |" * len(variants)]
    for subset in sorted({s for r in rows.values() for s in r["subsets"]}):
        n = max(sizes[v].get(subset, 0) for v in variants)
        cells = [f"{rows[v]['subsets'][subset]:.3f}" if subset in rows[v]["subsets"] else "-" for v in variants]
        lines.append(f"| {subset} | {section_of(subset) or 'none (not a RewardBench subset)'} | {n} | " + " | ".join(cells) + " |")
    if unknown:
        counted = {s: max(sizes[v].get(s, 0) for v in variants) for s in unknown}
        lines += ["", f"{sum(counted.values())} pairs in {len(unknown)} subsets RewardBench does not define "
                  f"({', '.join(f'{s}: {n}' for s, n in counted.items())}) are scored above and counted in the set's "
                  "accuracy, but belong to no section."]
    return lines + [""], plot


def best_of_n_section(judgments: pl.DataFrame, agreement: pl.DataFrame, judged_pairs: dict[str, int], out_dir: Path,
                      samples: int, seed: int) -> tuple[str, list[str]]:
    """Win rate of the MUSIC RM's Best-of-N conversations against the baseline RM's, per N, as
    the judge saw them in both orders, over the pairs it decided (`bon_summary`); judge errors (by
    reason) and drops are stated beside it, not hidden. `judged_pairs`: judge_agreement's pairs by reason."""
    lines = ["", "## Multi-turn Best-of-N (LLM judge, both orders)", ""]
    if judgments.height == 0:
        return "\n".join(lines + ["_Not run: materialize best_of_n._", ""]), []
    summary = bon_summary(judgments, samples, seed)
    largest = max(s["n"] for s in summary.values())
    if largest < SMALL_SAMPLE:
        lines += [f"**Tiny sample (at most {largest} judged contexts per N): these figures show the mechanics, not which "
                  "reward model is better.**", ""]
    asked = sum(s["asked"] for s in summary.values())
    errors = sum(s["errors"] for s in summary.values())
    if asked and errors / asked > 0.5:
        lines += [f"**The judge could not judge {errors} of the {asked} pairs it was asked about** (see the errors "
                  "column): they are left out of the win rates. Use a stronger judge model (`models: {judge: ...}`) "
                  "or a longer `evaluation.judge_sampling.max_tokens` if its answers were cut.", ""]
    lines += ["At every assistant turn the policy samples N answers and each reward model keeps its best; the",
              "judge compares the MUSIC RM's final conversation with the baseline RM's twice, in both orders. A",
              "win or loss counts only when both orders agree; a judge tie or disagreeing orders are a tie. A pair",
              "without a verdict in either order is a judge error, not a tie: errors are counted by reason (refused:",
              "the prompt did not fit the judge's context; cut: the answer hit max_tokens before its verdict;",
              "unparsed: no verdict) and left out of n. Win rate = (wins + ties/2) / n over the pairs the judge decided,",
              f"95% bootstrap interval over contexts ({samples} resamples). Sources: "
              + ", ".join(f"{s} ({c})" for s, c in sorted(Counter(judgments.filter(pl.col("n") == judgments["n"].min())["source"].to_list()).items())) + ".", "",
              "| N | n (decided) | MUSIC wins | ties | losses | win rate [95% CI] | judge errors: refused / cut / unparsed "
              "| identical conversations | dropped | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, s in summary.items():
        significant = s["n"] and (s["ci95"][0] > 0.5 or s["ci95"][1] < 0.5)
        lines.append(f"| {n} | {s['n']} | {s['wins']} | {s['ties']} | {s['losses']} | "
                     f"{s['win_rate']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
                     f"{s['errors']} of {s['asked']} ({100 * s['error_share']:.0f}%): "
                     f"{' / '.join(str(count) for count in s['judge_errors'].values())} | "
                     f"{s['reasons'].get('identical', 0)} | {sum(s['dropped'].values())} | "
                     f"{'significant' if significant else 'not significant (the interval contains 0.5)'} |")
    plot = _plot_win_rate(summary, out_dir / "win_rate_by_n.png")
    lines += ["", f"![win rate by N]({plot})", "", "## Judge agreement", ""]
    if not judged_pairs:
        lines += ["_Not run: materialize judge_agreement._"]
    else:
        failed = {r: judged_pairs.get(r, 0) for r in ERROR_REASONS}
        lines += [f"The judge compared {sum(judged_pairs.values())} evaluation pairs in both orders and could not judge "
                  f"{sum(failed.values())} of them (" + ", ".join(f"{r}: {c}" for r, c in failed.items())
                  + "); agreement is measured on the pairs it decided for one side.", "",
                  agreement_markdown(agreement)]
    return "\n".join(lines) + "\n", [plot]


def _plot_win_rate(summary: dict, path: Path) -> str:
    ns = [int(n) for n in summary]
    rates = [summary[str(n)]["win_rate"] for n in ns]
    low = [r - summary[str(n)]["ci95"][0] for n, r in zip(ns, rates)]
    high = [summary[str(n)]["ci95"][1] - r for n, r in zip(ns, rates)]
    with figure(path) as (_, ax):
        ax.errorbar(ns, rates, yerr=[low, high], marker="o", capsize=4)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (candidates per turn)")
        ax.set_ylabel("MUSIC RM win rate vs baseline")
        ax.set_ylim(0, 1)
    return path.name


def _plot_by_turns(correct: pl.DataFrame, variants: list[str], path: Path) -> str:
    with figure(path) as (_, ax):
        for i, v in enumerate(variants):
            by = correct.filter(pl.col("variant") == v).group_by("user_turns").agg(pl.col("correct").mean(), pl.len()).sort("user_turns")
            ax.bar([t + (i - 0.5) * 0.38 for t in by["user_turns"]], by["correct"], width=0.38, label=v)
            for t, acc, n in by.iter_rows():
                ax.annotate(f"n={n}", (t + (i - 0.5) * 0.38, acc), ha="center", va="bottom", fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("user turns in the conversation")
        ax.set_ylabel("pairwise accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend()
    return path.name


def _plot_sections(rows: dict, sections: list[str], path: Path) -> str:
    with figure(path) as (_, ax):
        for i, (v, r) in enumerate(rows.items()):
            ax.bar([k + (i - 0.5) * 0.38 for k in range(len(sections))], [100 * r["sections"].get(s, 0) for s in sections],
                   width=0.38, label=v)
        ax.set_xticks(range(len(sections)), sections)
        ax.set_ylabel("score")
        ax.legend()
    return path.name

