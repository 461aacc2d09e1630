"""`music-assets`: the demo and a few operator commands, on a persistent Dagster instance.

The demo materializes through `dagster.materialize` on `DagsterInstance.get()` (DAGSTER_HOME), so
its runs, materializations and checks show up afterwards in `dagster dev -w workspace.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from music_assets.settings import load_settings


def _instance(settings):
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = settings.home / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").touch()  # defaults: everything under DAGSTER_HOME
        os.environ["DAGSTER_HOME"] = str(home)
    return DagsterInstance.get()


def register_sources(instance, catalog) -> list[str]:
    """Adds every source the catalog knows as a dynamic partition; returns the new ones."""
    from music_assets.partitions import seed_partitions

    known = set(instance.get_dynamic_partitions(seed_partitions.name))
    new = [name for name in catalog.names() if name not in known]
    if new:
        instance.add_dynamic_partitions(seed_partitions.name, new)
    return new


def cmd_demo(args) -> int:
    from dagster import materialize

    from music_assets.definitions import ASSETS, build_resources

    settings = load_settings(args.config)
    # The demo keeps a CPU run to minutes: a few contexts unless the config says otherwise.
    settings.simulation.setdefault("max_contexts", args.max_contexts)
    resources = build_resources(settings)
    instance = _instance(settings)
    register_sources(instance, resources["seed_catalog"])
    sources = args.source or ["embedded"]
    for key in sources:
        print(f"demo: materializing the asset graph for seed source {key!r}")
        result = materialize(ASSETS, partition_key=key, instance=instance, resources=resources)
        if not result.success:
            print(f"demo: run {result.run_id} failed", file=sys.stderr)
            return 1
        for event in result.get_asset_materialization_events():
            mat = event.step_materialization_data.materialization
            rows = mat.metadata.get("dagster/row_count")
            print(f"  {mat.asset_key.to_user_string():<24} rows={rows.value if rows else '?'}")
    print(f"demo: done. DuckDB file: {settings.duckdb_path}")
    print(f"demo: open the UI with: DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev -w workspace.yaml")
    return 0


def cmd_sources(args) -> int:
    from music_assets.definitions import build_resources

    settings = load_settings(args.config)
    catalog = build_resources(settings)["seed_catalog"]
    instance = _instance(settings)
    new = register_sources(instance, catalog)
    for name in catalog.names():
        src = catalog.resolve(name)
        print(f"{name:<24} {src.format:<24} {src.location}{'  (new)' if name in new else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dagster import BetaWarning, PreviewWarning

    # We use the beta data-version API on purpose; the warnings would drown the demo's output.
    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(prog="music-assets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: $MUSIC_CONFIG, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the asset graph on the embedded defaults")
    demo.add_argument("--source", action="append", help="seed source(s) to run (default: embedded)")
    demo.add_argument("--max-contexts", type=int, default=6,
                      help="seed contexts simulated per source, unless the config sets simulation.max_contexts")
    demo.set_defaults(func=cmd_demo)
    sources = sub.add_parser("sources", help="register every known seed source as a partition and list them")
    sources.set_defaults(func=cmd_sources)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
