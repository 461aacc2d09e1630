"""Recomputation without a person: new or changed seed sources run their own chain, and stale
assets are refreshed in a nightly window.

Two mechanisms, each for what it can see:

- `seed_folder_sensor` watches *sources*. Every tick it lists the seed catalog (the embedded
  sample, `seed_sources` from the config, Hugging Face ids included, and every file in
  `seeds_dir`) and compares each source's fingerprint (sha256 of the file) with its cursor, per
  partition. A new source becomes a dynamic partition (a source with `shards: K`, K partitions)
  and one run of `seed_chain` (ingestion -> contexts -> simulation -> MUSIC pairs) per partition,
  so the shards of a large source run side by side; a file whose content changed gets a new run
  per partition (the run key holds the hash, so Dagster does not drop it as a duplicate); an
  unchanged source gets nothing, so the other partitions are never regenerated. A source whose
  registered partitions were made with another shard count is skipped with the reason (see
  `music_assets/seeds/shards.py`): re-sharding would move rows between partitions.
- `nightly_refresh` is declarative automation. Each asset (partition) carries the condition
  `NIGHTLY_REFRESH`: between 03:00 and 12:00 UTC, materialize it if it is missing (once per
  night, so a failing partition is not retried in a loop) or stale (its code version changed, or
  an upstream data version changed after it was last materialized), once nothing upstream is
  missing, running, or due for a refresh itself in another run. A seed partition's chain is
  requested together (one run); the unpartitioned data assets and the reward models follow
  after the partitions they read have finished, in the same window, and only when their
  upstream data really changed: an unchanged data version stops the cascade, so a re-ingested
  but identical file does not retrain the reward models. Staleness that arose before the
  sensor's first evaluation is not seen (the conditions record changes from tick to tick); the
  UI's "Materialize unsynced" covers that case.

Why declarative automation and not a `ScheduleDefinition` over a job: a schedule launches a fixed
job for fixed partitions and cannot tell which partitions are stale, so it would either re-run
every seed partition's LLM generation and both reward models every night, or need our own
staleness bookkeeping. Automation conditions are evaluated per asset partition against the
instance's records, which is what "stale" means in Dagster, and `dagster.evaluate_automation_conditions`
tests them tick by tick at chosen times (tests/end_to_end/test_automation.py). Conditions are attached in
`with_nightly_refresh` (to every asset that does not set its own), so the asset modules stay as
they are; the UI shows the condition and each evaluation on the asset's Automation tab.

Both sensors default to STOPPED: they launch vLLM generation and reward-model training, which
should be an explicit choice per Dagster instance (turn them on in the UI under Automation, or
`dagster sensor start seed_folder_sensor` / `dagster sensor start nightly_refresh`); once started,
the instance remembers it. With the sensor off, partitions can still be added with
`music-assets sources` and materialized by hand.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetKey,
    AssetSelection,
    AssetsDefinition,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from music_assets.common.metadata import latest_materialization
from music_assets.common.partitions import seed_partitions
from music_assets.seeds.reader import ResolvedSource
from music_assets.seeds.assets import seed_ingestion
from music_assets.simulation.assets import music_pairs, seed_contexts, simulated_branches
from resources.seed_catalog import SeedCatalog

# One seed partition's whole chain: ingestion (both outputs and its checks) -> MUSIC pairs.
seed_chain_job = define_asset_job(
    "seed_chain",
    selection=AssetSelection.assets(seed_ingestion, seed_contexts, simulated_branches, music_pairs),
    description="Ingest one seed source and simulate its MUSIC pairs (one seed_sources partition).",
)

# Tags on the sensor's runs, so the UI (and a test) can tell why a run was started.
FINGERPRINT_TAG = "music/seed_sha256"
CHANGE_TAG = "music/seed_change"  # 'new' | 'changed'


@dataclass
class SourceScan:
    """What one look at the catalog found."""

    run_requests: list[RunRequest] = field(default_factory=list)
    new_partitions: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)  # the next cursor: partition key -> sha256
    unchanged: list[str] = field(default_factory=list)  # partition keys
    skipped: dict[str, str] = field(default_factory=dict)  # source -> why nothing was decided this tick


def scan_sources(catalog: SeedCatalog, seen: dict[str, str], instance) -> SourceScan:
    """Decides which sources need a run of the seed chain.

    `seen` is the cursor: the fingerprint each partition (a source, or a shard of one: all shards
    of a source share its file's fingerprint, computed once per tick) had when its last run was
    requested. A partition the cursor has never seen (first tick, or a cursor reset) is compared
    with the `source_sha256` its latest ingestion recorded in the instance instead, so turning the
    sensor on over an existing warehouse does not regenerate what is already there. A source that
    cannot be read, or whose shard count changed, is skipped with its reason and keeps its old
    cursor entries (retried next tick); it never stops the others.
    """
    scan = SourceScan(fingerprints=dict(seen))
    partitions = set(instance.get_dynamic_partitions(seed_partitions.name))
    conflicts = catalog.shard_conflicts(partitions)
    for name in catalog.names():
        if name in conflicts:
            scan.skipped[name] = conflicts[name]
            continue
        try:
            source = catalog.source(name)
            fingerprint = source.fingerprint()
        except Exception as exc:  # a bad config entry or an unreadable file: report it, go on
            scan.skipped[name] = f"cannot read: {type(exc).__name__}: {exc}"
            continue
        changed = {}
        for key in catalog.partition_keys(name):
            before = seen[key] if key in seen else _recorded_fingerprint(instance, key, partitions)
            if before == fingerprint:
                scan.fingerprints[key] = fingerprint
                scan.unchanged.append(key)
            else:
                changed[key] = before
        unavailable = _hf_unavailable(source) if changed and source.hf_dataset else None
        if unavailable:
            scan.skipped[name] = unavailable
            continue
        for key, before in changed.items():
            scan.fingerprints[key] = fingerprint
            if key not in partitions:
                scan.new_partitions.append(key)
            scan.run_requests.append(RunRequest(
                partition_key=key,
                # Dagster launches a run key once per sensor: naming the change (not just the new hash)
                # lets a file that is changed back to earlier content run again.
                run_key=f"{key}@{(before or 'new')[:16]}->{fingerprint[:16]}",
                tags={FINGERPRINT_TAG: fingerprint, CHANGE_TAG: "new" if before is None else "changed"},
            ))
    return scan


def _recorded_fingerprint(instance, key: str, partitions: set[str]) -> str | None:
    """The file hash the partition's latest ingestion recorded, if it was ever ingested."""
    if key not in partitions:
        return None
    record = latest_materialization(instance, AssetKey("seed_conversations"), key)
    entry = record.asset_materialization.metadata.get("source_sha256") if record else None
    return entry.value if entry is not None else None


def _hf_unavailable(source: ResolvedSource) -> str | None:
    """Why a Hugging Face dataset source cannot be ingested now, or None.

    Its fingerprint is the hash of `id:split` (the content is not known before downloading), so
    the sensor registers the id and runs its chain once; a new revision on the Hub is not
    noticed. Offline, or without the `datasets` package, the run could only fail: skip with the
    reason instead, and try again on the next tick.
    """
    if not Path(source.hf_dataset).expanduser().is_dir():  # a local dataset folder needs no network
        try:
            from huggingface_hub import HfApi

            HfApi().dataset_info(source.hf_dataset, timeout=10)
        except Exception as exc:  # offline mode, no network, unknown id, private without a token
            return f"Hugging Face dataset {source.hf_dataset!r} is not reachable ({type(exc).__name__}: {exc})"
    if importlib.util.find_spec("datasets") is None:
        return f"Hugging Face dataset {source.hf_dataset!r}: the `datasets` package is not installed"
    return None


@sensor(
    name="seed_folder_sensor",
    job=seed_chain_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    description="New or changed seed sources (files in seeds_dir, configured paths and HF ids): "
                "adds the partition (one per shard) and runs each partition's seed chain.",
)
def seed_folder_sensor(context: SensorEvaluationContext, seed_catalog: SeedCatalog) -> SensorResult:
    seen = json.loads(context.cursor) if context.cursor else {}
    scan = scan_sources(seed_catalog, seen, context.instance)
    for name, reason in scan.skipped.items():
        context.log.warning(f"seed source {name!r} skipped: {reason}")
    for request in scan.run_requests:
        context.log.info(f"seed source {request.partition_key!r}: {request.tags[CHANGE_TAG]} "
                         f"(sha256 {request.tags[FINGERPRINT_TAG][:12]}): requesting seed_chain")
    skip = None
    if not scan.run_requests:
        skip = f"no new or changed seed sources ({len(scan.unchanged)} unchanged)" + "".join(
            f"; skipped {name!r}: {reason}" for name, reason in scan.skipped.items())
    return SensorResult(
        run_requests=scan.run_requests,
        skip_reason=skip,
        cursor=json.dumps(scan.fingerprints, sort_keys=True),
        dynamic_partitions_requests=[seed_partitions.build_add_request(scan.new_partitions)] if scan.new_partitions else [],
    )


NIGHTLY_CRON = "0 3 * * *"  # the refresh window opens at 03:00 ...
WINDOW_CLOSES_CRON = "0 12 * * *"  # ... and closes at 12:00; staleness found later waits a night
TIMEZONE = "UTC"


def _nightly_refresh() -> AutomationCondition:
    ac = AutomationCondition
    opens = ac.cron_tick_passed(NIGHTLY_CRON, TIMEZONE)
    in_window = opens.since(ac.cron_tick_passed(WINDOW_CLOSES_CRON, TIMEZONE)).with_label(
        f"in the refresh window ({NIGHTLY_CRON} to {WINDOW_CLOSES_CRON} {TIMEZONE})")
    # An upstream partition got a new data version in a run that did not also produce this one
    # (a chain run that rewrote both leaves the downstream up to date).
    upstream_changed = ac.any_deps_match(
        ac.data_version_changed() & ~ac.executed_with_root_target()).with_label("an upstream data version changed")
    stale = (ac.code_version_changed() | upstream_changed).since_last_handled().with_label(
        "stale since last requested or updated")
    tried_tonight = (ac.newly_requested() | ac.newly_updated()).since(opens).with_label("requested or updated tonight")
    missing = (ac.missing() & ~tried_tonight).with_label("missing, not yet tried tonight")
    due = (stale | missing).with_label("stale, or missing and not tried tonight")
    # An upstream that is due itself will change first; running now would run twice. Only an
    # upstream requested in this same run (same seed partition) does not make us wait.
    upstream_due = ac.any_deps_match(due & ~ac.will_be_requested()).with_label("an upstream is due in another run")
    return (
        in_window
        & due
        & ~upstream_due
        & ~ac.any_deps_missing()
        & ~ac.any_deps_in_progress()
        & ~ac.in_progress()
    ).with_label("nightly refresh of stale or missing partitions")


NIGHTLY_REFRESH = _nightly_refresh()

nightly_refresh_sensor = AutomationConditionSensorDefinition(
    "nightly_refresh",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.STOPPED,
    description="Nightly (03:00-12:00 UTC) refresh of stale or missing asset partitions: evaluates every "
                "asset's automation condition (NIGHTLY_REFRESH unless it sets its own).",
)


def with_nightly_refresh(assets: Sequence[AssetsDefinition]) -> list[AssetsDefinition]:
    """The assets, each one without an automation condition of its own given the nightly refresh."""
    return [a.map_asset_specs(lambda spec: spec if spec.automation_condition
                              else spec.replace_attributes(automation_condition=NIGHTLY_REFRESH)) for a in assets]
