"""`music-assets`: the demo and a few operator commands, on a persistent Dagster instance.

The demo materializes through `dagster.materialize` on `DagsterInstance.get()` (DAGSTER_HOME), so
its runs, materializations and checks show up afterwards in `dagster dev -w workspace.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from music_assets.common.config import ConfigError
from music_assets.settings import DEMO_CONFIG, load_settings
from music_assets.training.config import PRECISIONS, STRATEGIES


# DuckDB allows one writer process per file: every step that writes it is in the pool
# `duckdb_writers`, and this limit lets one such step run at a time across all runs.
INSTANCE_CONFIG = """\
# Written by music-assets; everything else keeps Dagster's defaults (storage under DAGSTER_HOME).
concurrency:
  pools:
    default_limit: 1
"""


def ensure_instance_config(home: Path) -> Path:
    """A Dagster home whose dagster.yaml limits concurrency pools; an existing file is left alone."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_CONFIG)
    return config


def _instance(settings):
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = settings.home / "dagster_home"
        ensure_instance_config(home)
        os.environ["DAGSTER_HOME"] = str(home)
    return DagsterInstance.get()


def register_sources(instance, catalog) -> list[str]:
    """Adds every source the catalog knows as a dynamic partition (K for a source with `shards: K`);
    returns the new ones. Refuses, adding nothing, when a source's shard count changed."""
    from music_assets.common.partitions import seed_partitions

    known = set(instance.get_dynamic_partitions(seed_partitions.name))
    conflicts = catalog.shard_conflicts(known)
    if conflicts:
        raise ConfigError("; ".join(conflicts.values()))
    new = [key for key in catalog.partition_keys() if key not in known]
    if new:
        instance.add_dynamic_partitions(seed_partitions.name, new)
    return new


def demo_settings(args):
    """The demo's settings: configs/demo.yaml (a CPU run in minutes) under the given config, with
    `--max-contexts` over both."""
    flags = {"simulation.max_contexts": args.max_contexts} if args.max_contexts is not None else {}
    return load_settings(args.config, base_files=(DEMO_CONFIG,), flags=flags)


def cmd_demo(args) -> int:
    from music_assets.assembly import build_resources, run_groups
    from music_assets.training.assets import reward_variants

    settings = demo_settings(args)
    resources = build_resources(settings)
    # the code versions these settings give (the demo's training options are part of reward_model's)
    seed_assets, data_assets, training_assets, evaluation_assets, judged_assets, report_assets = run_groups(settings)
    instance = _instance(settings)
    catalog = resources["seed_catalog"]
    register_sources(instance, catalog)
    # a sharded source's name stands for all its shards (one run each, one after the other here)
    keys = [k for s in args.source or ["embedded"] for k in (catalog.partition_keys(s) if s in catalog.names() else [s])]
    for key in keys:
        print(f"demo: seed source {key!r}: ingestion, contexts, simulation, MUSIC pairs")
        if not _run(seed_assets, key, instance, resources):
            return 1
    if args.skip_training:
        return _done(settings)
    print("demo: evaluation sets, deduplication, training splits and exports")
    if not _run(data_assets, None, instance, resources):
        return 1
    for variant in reward_variants.get_partition_keys():
        print(f"demo: reward model {variant!r}: training and evaluation")
        if not _run(training_assets + evaluation_assets, variant, instance, resources):
            return 1
    print("demo: multi-turn Best-of-N with the judge, judge agreement, evaluation report")
    if not _run(judged_assets + report_assets, None, instance, resources):
        return 1

    print(f"demo: report: {Path(settings.data.exports_dir).parent / 'reports' / 'evaluation_report.md'}")
    return _done(settings)


def _run(assets, partition_key, instance, resources) -> bool:
    from dagster import materialize

    result = materialize(assets, partition_key=partition_key, instance=instance, resources=resources,
                         raise_on_error=False)
    if not result.success:
        print(f"demo: run {result.run_id} failed", file=sys.stderr)
        return False
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        md = mat.metadata
        shown = {k: md[k].value for k in ("dagster/row_count", "test_accuracy", "checkpoint", "path") if k in md}
        print(f"  {mat.asset_key.to_user_string():<24} {shown}")
    return True


def _done(settings) -> int:
    from music_assets.lineage import warehouse_name

    print(f"demo: done. Warehouse: {warehouse_name(settings)}")
    print(f"demo: open the UI with: DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev -w workspace.yaml")
    return 0


def cmd_config(args) -> int:
    """Every setting with its value and the source that set it (default, a file, the environment,
    a flag); with --demo, as the demo resolves it."""
    settings = demo_settings(args) if args.demo else load_settings(args.config)
    rows = settings.resolved()
    width = max(len(path) for path, *_ in rows)
    for path, value, origin, help_ in rows:
        if args.help_text and help_:
            print(f"# {help_}")
        print(f"{path:<{width}}  {json.dumps(value, default=str)}  [{origin}]")
    return 0


def cmd_sources(args) -> int:
    from music_assets.assembly import build_resources

    settings = load_settings(args.config)
    catalog = build_resources(settings)["seed_catalog"]
    instance = _instance(settings)
    new = register_sources(instance, catalog)
    for name in catalog.names():
        keys = catalog.partition_keys(name)
        src = catalog.source(name)
        shards = f"  ({len(keys)} shards: {keys[0]} .. {keys[-1]})" if len(keys) > 1 else ""
        fresh = sum(k in new for k in keys)
        note = "" if not fresh else "  (new)" if fresh == len(keys) else f"  ({fresh} new partitions)"
        print(f"{name:<24} {src.format:<24} {src.location}{shards}{note}")
    return 0


def cmd_lineage(args) -> int:
    """What produced a checkpoint's training data (see music_assets/lineage.py)."""
    from music_assets.lineage import LineageError, checkpoint_lineage, render

    settings = load_settings(args.config)
    try:
        report = checkpoint_lineage(args.target, settings, _instance(settings))
    except LineageError as exc:
        print(f"lineage: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def cmd_plan_training(args) -> int:
    """Per-rank GPU memory of the configured training launch, and whether it fits (see
    music_assets/training/memory_plan.py); the flags answer what-if questions over the config."""
    from dataclasses import replace

    from music_assets.training.memory_plan import backbone_config, plan_memory, render

    flags = {f"training.{key}": value for key, value in (
        ("processes", args.processes), ("options.precision", args.precision),
        ("options.gradient_checkpointing", args.gradient_checkpointing)) if value is not None}
    settings = load_settings(args.config, flags=flags)
    training = settings.training
    try:
        config = backbone_config(training.options.backbone, settings.compute.get("attn_implementation"))
        plans = [plan_memory(config, training.options, replace(training, strategy=strategy), args.gpu_memory_gib)
                 for strategy in args.strategy or [training.strategy]]
    except (ValueError, OSError) as exc:  # an architecture without formulas (UnsupportedArchitecture), no backbone
        print(f"plan-training: {exc}", file=sys.stderr)
        return 2
    print(render(plans, training.options))
    return 0


def cmd_check_config(args) -> int:
    """Checks a config (every key and value, as any command does) and prints the plan of its run:
    partitions, requests and tokens per stage, GPU memory per training rank, what is still needed.
    Exit 0 when the plan fits, 1 when it does not (2, as everywhere, for an invalid config)."""
    from music_assets.check_config import check, render

    settings = load_settings(args.file)
    plan = check(settings, args.gpu_memory_gib)
    print(render(plan, args.file))
    return 1 if plan.problems else 0


def main(argv: list[str] | None = None) -> int:
    from dagster import BetaWarning, PreviewWarning

    # We use the beta data-version API on purpose; the warnings would drown the demo's output.
    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(prog="music-assets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: $MUSIC_CONFIG, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the asset graph on the embedded defaults")
    demo.add_argument("--source", action="append",
                      help="seed source(s) or shard partition(s) to run; a sharded source's name runs every shard "
                           "(default: embedded)")
    demo.add_argument("--max-contexts", type=int, default=None,
                      help="seed contexts simulated per source (over simulation.max_contexts; configs/demo.yaml: 8)")
    demo.add_argument("--skip-training", action="store_true",
                      help="stop after the MUSIC pairs (no dedup, splits or reward models)")
    demo.set_defaults(func=cmd_demo)
    config = sub.add_parser("config", help="print every setting, its value and where it came from")
    config.add_argument("--demo", action="store_true", help="as `demo` resolves it (configs/demo.yaml underneath)")
    config.add_argument("--max-contexts", type=int, default=None, help=argparse.SUPPRESS)
    config.add_argument("--help-text", action="store_true", help="print each setting's description above it")
    config.set_defaults(func=cmd_config)
    sources = sub.add_parser("sources", help="register every known seed source as a partition (one per shard) "
                                             "and list them")
    sources.set_defaults(func=cmd_sources)
    lineage = sub.add_parser("lineage", help="seed sources, prompts, models and upstream data versions behind a checkpoint")
    lineage.add_argument("target", nargs="?", default="music", metavar="CHECKPOINT_OR_VARIANT",
                         help="a checkpoint folder, or a variant (baseline | music) for its LATEST checkpoint; default music")
    lineage.add_argument("--json", action="store_true", help="print the report as JSON")
    lineage.set_defaults(func=cmd_lineage)
    plan = sub.add_parser("plan-training", help="per-GPU memory of the training launch (params, grads, optimizer, "
                                                 "activations) and whether it fits")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    plan.add_argument("--processes", type=int, default=None, help="ranks, one per GPU (over training.processes)")
    plan.add_argument("--strategy", action="append", choices=STRATEGIES,
                      help="over training.strategy; repeat it for one column per strategy")
    plan.add_argument("--precision", choices=PRECISIONS, default=None,
                      help="over training.options.precision (auto: bf16, as on a GPU)")
    plan.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                      help="over training.options.gradient_checkpointing")
    plan.set_defaults(func=cmd_plan_training)
    check = sub.add_parser("check-config", help="check a config without running anything and print the plan of its "
                                                "run: partitions, requests and tokens per stage, GPU memory, what "
                                                "it still needs")
    check.add_argument("file", help="the YAML config to check")
    check.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    check.set_defaults(func=cmd_check_config)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:  # a bad config is the user's to fix: its path and source, no traceback
        print(f"music-assets: config: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
