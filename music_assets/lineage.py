"""Lineage audit: what produced a reward-model checkpoint's training data.

`music-assets lineage [CHECKPOINT_OR_VARIANT] [--json]` reports, for a checkpoint folder (or a
variant's LATEST checkpoint):
- the seed sources in its training data, with the sha256 of each file as it was ingested (one
  entry per partition: a sharded source's shards each, with a warning when its shards in the
  training data are not all there or were cut from different versions of its file);
- the prompt version, engines (models) and sampling settings that simulated its MUSIC pairs;
- the data version of every upstream asset, per partition, as it was when the model was trained.

The Dagster instance is the record of history: DuckDB holds only the latest tables, and a
checkpoint may be older than them. So the report starts from the `reward_model` materialization
that wrote the checkpoint (its data version is the checkpoint's folder name) and walks the asset
graph upstream: for each dependency it takes the latest materialization recorded *before* its
consumer's (per partition: the consumer's own partition on a seed-to-seed edge, every partition
materialized by then otherwise). Dagster's own `dagster/input_event_pointer/*` tags hold the same
for unpartitioned inputs but only one event for a partitioned input, hence the walk. DuckDB adds
pair-level counts (MUSIC pairs per generation key) only when its `training_splits` is the one the
checkpoint was trained on; otherwise the report says so.
"""

from __future__ import annotations

import json
from datetime import datetime, UTC
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter

from music_assets.common.metadata import latest_materialization
from music_assets.common.tables import sql
from music_assets.seeds.shards import partition_keys, split_partition_key
from music_assets.training.train_rm import METADATA_FILE

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
TRAINED_ASSET = AssetKey("reward_model")


class LineageError(Exception):
    """The checkpoint cannot be found or read; the message says which and where."""


def resolve_checkpoint(target: str, checkpoints) -> tuple[str, str]:
    """(location, variant) for a checkpoint folder or URL, or for a variant name (its LATEST)."""
    from music_assets.training.assets import reward_variants

    variants = reward_variants.get_partition_keys()
    if target in variants:
        location = checkpoints.latest(target)
        if location is None:
            raise LineageError(f"no checkpoint of variant {target!r} under {checkpoints.root}: "
                               f"materialize reward_model[{target}] first")
        return location, target
    if "://" in target or Path(target).expanduser().is_dir():
        location = target if "://" in target else str(Path(target).expanduser().resolve())
        variant = location.rstrip("/").rsplit("/", 2)[-2]  # <root>/<variant>/<version>
        return location, variant
    raise LineageError(f"{target!r} is neither a checkpoint folder nor a variant ({', '.join(variants)})")


def read_checkpoint_metadata(location: str) -> dict:
    """The checkpoint's `music_metadata.json`: training config, metrics, upstream data versions."""
    try:
        if "://" in location and not location.startswith("file://"):
            import fsspec

            with fsspec.open(f"{location.rstrip('/')}/{METADATA_FILE}", "r") as f:
                return json.load(f)
        return json.loads((Path(location.removeprefix("file://")) / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise LineageError(f"{location}: cannot read {METADATA_FILE} ({type(exc).__name__}: {exc}); "
                           "is this a reward-model checkpoint folder?") from exc


def walk_upstream(instance, asset_graph, key: AssetKey, record) -> list[dict]:
    """Every upstream materialization that fed `record` (of `key`), oldest first, one entry per
    (asset, partition); an input never materialized before its consumer is listed as missing."""
    found: dict[tuple, dict] = {}
    stack = [(key, record)]
    while stack:
        consumer_key, consumer = stack.pop()
        node = asset_graph.get(consumer_key)
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            parent_def = asset_graph.get(parent).partitions_def
            if parent_def is None:
                partitions = [None]
            elif parent_def == node.partitions_def:
                partitions = [consumer.partition_key]
            else:  # e.g. every seed partition feeds deduplicated_pairs; none yet: listed as missing
                partitions = sorted(instance.get_materialized_partitions(parent, before_cursor=consumer.storage_id)) or [None]
            for partition in partitions:
                upstream = latest_materialization(instance, parent, partition, before=consumer.storage_id)
                ident = (parent, partition, upstream.storage_id if upstream else None)
                if ident in found:
                    continue
                found[ident] = describe(parent, partition, upstream, used_by=consumer_key)
                if upstream is not None:
                    stack.append((parent, upstream))
    return sorted(found.values(), key=lambda n: (n["storage_id"] is not None, n["storage_id"] or 0, n["asset"]))


def describe(key: AssetKey, partition: str | None, record, used_by: AssetKey | None = None) -> dict:
    """One materialization as the report shows it (the raw metadata stays in `metadata`)."""
    out = {"asset": key.to_user_string(), "partition": partition}
    if used_by is not None:
        out["used_by"] = used_by.to_user_string()
    if record is None:
        return {**out, "missing": True, "data_version": None, "storage_id": None}
    mat = record.asset_materialization
    tags = mat.tags or {}
    return {
        **out,
        "data_version": tags.get(DATA_VERSION_TAG),
        "code_version": tags.get(CODE_VERSION_TAG),
        "run_id": record.run_id,
        "materialized_at": datetime.fromtimestamp(record.timestamp, UTC).isoformat(timespec="seconds"),
        "storage_id": record.storage_id,
        "metadata": {k: v.value for k, v in mat.metadata.items()},
    }


def _training_event(instance, variant: str, version: str):
    """The reward_model[variant] materialization whose data version is the checkpoint's version."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=TRAINED_ASSET, asset_partitions=[variant]), limit=1000).records
    return next((r for r in records if (r.asset_materialization.tags or {}).get(DATA_VERSION_TAG) == version), None)


def _read_connection(settings):
    """A connection for reading the warehouse: the DuckDB file read-only (a writer may be running),
    or the shared lake (DuckLake: many readers and writers at once)."""
    import duckdb

    if settings.warehouse.get("backend") == "ducklake":
        from resources.warehouse import DuckLake, connect_lake

        return connect_lake(DuckLake(**{k: v for k, v in settings.warehouse.items() if k != "backend"}))
    return duckdb.connect(str(settings.duckdb_path), read_only=True)


def warehouse_name(settings) -> str:
    if settings.warehouse.get("backend") == "ducklake":
        return f"DuckLake {settings.warehouse.get('data_path')}"
    return f"DuckDB {settings.duckdb_path}"


def _duckdb_pairs(settings, variant: str) -> tuple[list[dict], list[dict]]:
    """From the warehouse: pairs per (source, origin) in the variant's splits, and its MUSIC pairs
    grouped by what generated them (generation key, prompt version, models, sampling)."""
    con = _read_connection(settings)
    try:
        tables = {name for name, in con.execute(sql("lineage/lineage_tables")).fetchall()}
        if "training_splits" not in tables:  # the instance says otherwise: another or a replaced file
            raise LookupError("no music.training_splits table")
        per_source = con.execute(sql("lineage/lineage_pairs_per_source"), {"variant": variant}).pl().to_dicts()
        generations = []
        if "music_pairs" in tables:
            generations = con.execute(sql("lineage/lineage_music_generations"), {"variant": variant}).pl().to_dicts()
        for g in generations:
            g["models"], g["sampling"] = json.loads(g["models"]), json.loads(g["sampling"])
        return per_source, generations
    finally:
        con.close()


def checkpoint_lineage(target: str, settings, instance) -> dict:
    """The lineage report of a checkpoint (folder or variant name) as a JSON-ready dict."""
    from music_assets.assembly import build_definitions
    from resources.checkpoints import CheckpointStore

    location, variant = resolve_checkpoint(target, CheckpointStore(root=settings.checkpoints))
    saved = read_checkpoint_metadata(location)
    version = location.rstrip("/").rsplit("/", 1)[-1]
    recorded = saved.get("upstream", {})
    report = {
        "checkpoint": {
            "location": location, "variant": variant, "version": version,
            "backbone": saved.get("config", {}).get("backbone"), "config": saved.get("config", {}),
            "metrics": {k: v for k, v in saved.get("metrics", {}).items() if not isinstance(v, (dict, list))},
            "recorded_upstream_data_versions": recorded,
        },
        "warnings": [],
    }
    event = _training_event(instance, variant, version)
    if event is None:
        report["warnings"].append(
            f"no reward_model[{variant}] materialization with data version {version} in this Dagster instance "
            "(another DAGSTER_HOME?): only the versions recorded in the checkpoint are known")
        report.update(training_run=None, upstream=[], seed_sources=[], simulation=[], training_data=None)
        return report

    report["training_run"] = {k: v for k, v in describe(TRAINED_ASSET, variant, event).items() if k != "metadata"}
    upstream = walk_upstream(instance, build_definitions(settings).resolve_asset_graph(), TRAINED_ASSET, event)
    by_asset: dict[str, list[dict]] = {}
    for node in upstream:
        by_asset.setdefault(node["asset"], []).append(node)
    for asset, expected in recorded.items():
        walked = [n.get("data_version") for n in by_asset.get(asset, [])]
        if expected is not None and expected not in walked:
            report["warnings"].append(f"{asset}: the checkpoint recorded data version {expected}, "
                                      f"the instance's history before training has {walked or 'none'}")

    splits = (by_asset.get("training_splits") or [{}])[0]
    composition = splits.get("metadata", {}).get("composition", {}).get(variant, {})
    report["training_data"] = {"training_splits_data_version": splits.get("data_version"),
                               "per_split": composition.get("per_split"), "per_source": composition.get("per_source")}
    per_source_db, generations = _pairs_if_current(report, settings, instance, variant, splits.get("data_version"))
    report["seed_sources"] = [_seed_source(n, composition, per_source_db) for n in by_asset.get("seed_conversations", [])]
    report["warnings"] += shard_warnings(report["seed_sources"])
    report["simulation"] = [_simulation(n, generations) for n in by_asset.get("simulated_branches", [])]
    report["upstream"] = [{k: v for k, v in n.items() if k != "metadata"} for n in upstream]
    return report


def _pairs_if_current(report, settings, instance, variant, trained_on):
    """DuckDB pair counts, when the warehouse's training_splits is the one this checkpoint used."""
    current = latest_materialization(instance, AssetKey("training_splits"))
    current_version = (current.asset_materialization.tags or {}).get(DATA_VERSION_TAG) if current else None
    if trained_on is None or current_version != trained_on:
        report["warnings"].append(
            f"training_splits is now {current_version}, the checkpoint was trained on {trained_on}: "
            "pair-level counts from DuckDB are omitted (they would describe newer data)")
        return None, None
    try:
        return _duckdb_pairs(settings, variant)
    except Exception as exc:  # no file, or a writer holds the lock: the instance's record still stands
        report["warnings"].append(f"{warehouse_name(settings)}: {type(exc).__name__}: {exc}; pair-level counts omitted")
        return None, None


def _seed_source(node: dict, composition: dict, per_source_db: list[dict] | None) -> dict:
    md = node.get("metadata", {})
    source = node["partition"]
    name, shard = split_partition_key(source) if source is not None else (None, None)
    out = {
        "source": source, "source_name": name, "shard": None if shard is None else [shard.number, shard.count],
        "location": md.get("source_location"), "sha256": md.get("source_sha256"),
        "rows": md.get("dagster/row_count"), "rows_quarantined": md.get("rows_quarantined"),
        "data_version": node.get("data_version"), "ingested_at": node.get("materialized_at"),
        "pairs_in_training_data": (composition.get("per_source") or {}).get(source, 0),
    }
    if per_source_db is not None:
        out["pairs_by_origin"] = {r["origin"]: r["pairs"] for r in per_source_db if r["source"] == source}
    return out


def shard_warnings(seed_sources: list[dict]) -> list[str]:
    """What is wrong with the sharded sources among a checkpoint's seed partitions: a shard that
    never fed it (the model saw part of the source), or shards ingested from different versions of
    the file (some rows of the file's older version, some of the newer)."""
    by_name: dict[str, list[dict]] = {}
    for s in seed_sources:
        if s.get("shard") is not None:
            by_name.setdefault(s["source_name"], []).append(s)
    warnings = []
    for name, shards in sorted(by_name.items()):
        count = shards[0]["shard"][1]
        missing = sorted(set(partition_keys(name, count)) - {s["source"] for s in shards if s["sha256"] is not None})
        if missing:
            warnings.append(f"seed source {name!r}: {len(missing)} of its {count} shards were not ingested before "
                            f"training ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        versions = {s["sha256"] for s in shards if s["sha256"] is not None}
        if len(versions) > 1:
            warnings.append(f"seed source {name!r}: its shards were ingested from {len(versions)} different versions "
                            f"of {shards[0]['location']} (sha256 {', '.join(sorted(v[:12] for v in versions))})")
    return warnings


def _simulation(node: dict, generations: list[dict] | None) -> dict:
    """One simulated seed partition; pair counts are None when DuckDB cannot tell (newer splits)."""
    md = node.get("metadata", {})
    used = None if generations is None else [g for g in generations if g["source"] == node["partition"]]
    return {
        "source": node["partition"], "prompt_version": md.get("prompt_version"),
        "generation_key": md.get("generation_key"), "models": md.get("models"), "settings": md.get("settings"),
        "contexts_completed": md.get("contexts_completed"), "data_version": node.get("data_version"),
        "simulated_at": node.get("materialized_at"),
        "music_pairs_in_training_data": None if used is None else sum(g["pairs"] for g in used),
        "pairs_by_generation": used,
    }


def render(report: dict) -> str:
    """The report for a person: one block per question, full hashes (they are what gets compared)."""
    ck = report["checkpoint"]
    lines = [f"checkpoint  {ck['location']}",
             f"  variant {ck['variant']}, version {ck['version']}, backbone {ck['backbone']}"]
    if ck["metrics"].get("test_accuracy") is not None:
        lines.append(f"  test accuracy {ck['metrics']['test_accuracy']:.4f} on {ck['metrics'].get('test_pairs')} pairs")
    run = report.get("training_run")
    if run:
        lines.append(f"  trained in run {run['run_id']} at {run['materialized_at']}")
    data = report.get("training_data")
    if data:
        lines += ["", f"training data  training_splits {data['training_splits_data_version']}"]
        per_split = data.get("per_split") or {}
        for split in sorted(per_split, key=["train", "validation", "test"].index):
            counts = sorted(per_split[split].items(), reverse=True)  # seed, then music
            lines.append(f"  {split:<10} " + ", ".join(f"{n} {origin}" for origin, n in counts))
    if report.get("seed_sources"):
        lines += ["", "seed sources (sha256 of the file as ingested)"]
        for s in report["seed_sources"]:
            lines.append(f"  {s['source']:<20} {s['pairs_in_training_data']:>6} pairs in training data  sha256 {s['sha256']}")
            lines.append(f"  {'':<20} {s['location']}  ({s['rows']} rows, ingested {s['ingested_at']})")
    if report.get("upstream") and not report.get("simulation"):
        lines += ["", "MUSIC simulation  none: no simulated_branches materialization fed this training data"]
    if report.get("simulation"):
        lines += ["", "MUSIC simulation"]
        for s in report["simulation"]:
            lines.append(f"  {s['source']:<20} prompt version {s['prompt_version']}  generation key {s['generation_key']}")
            used = s["music_pairs_in_training_data"]
            lines.append(f"  {'':<20} {'?' if used is None else used} MUSIC pairs in training data, "
                         f"{s['contexts_completed']} contexts completed")
            for role, engine in (s["models"] or {}).items():
                lines.append(f"  {'':<20} {role}: {json.dumps(engine, sort_keys=True)}")
            lines.append(f"  {'':<20} settings: {json.dumps(s['settings'], sort_keys=True)}")
    if report.get("upstream"):
        lines += ["", "upstream data versions (as of training)"]
        for n in report["upstream"]:
            name = n["asset"] + (f"[{n['partition']}]" if n["partition"] is not None else "")
            if n.get("missing"):
                lines.append(f"  {name:<34} never materialized before {n['used_by']}")
            else:
                lines.append(f"  {name:<34} {n['data_version']}  code {n['code_version']}  "
                             f"run {n['run_id'][:8]}  {n['materialized_at']}")
    if report["warnings"]:
        lines += ["", "warnings"] + [f"  {w}" for w in report["warnings"]]
    return "\n".join(lines)
