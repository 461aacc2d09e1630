"""Automation under real Dagster: the seed-folder sensor on a persistent instance with real seed
files (slices of UltraFeedback), its run requests executed as real runs of `seed_chain`, and the
nightly refresh conditions evaluated tick by tick with `evaluate_automation_conditions`."""

import json
from datetime import datetime, UTC

import duckdb
import pytest
from dagster import (AssetKey, AssetRecordsFilter, DagsterInstance, DataVersion, Definitions, MaterializeResult, asset,
                     evaluate_automation_conditions, instance_for_test, materialize)

from music_assets.automation import CHANGE_TAG, FINGERPRINT_TAG, with_nightly_refresh
from music_assets.assembly import build_definitions
from music_assets.common.metadata import latest_materialization
from music_assets.common.partitions import seed_partitions
from tests.helpers import SLICES, load_settings_in, sensor_tick, short_tiny_simulation, write_seed

INGESTION = ["seed_conversations", "seed_quarantine"]
CHEAP = INGESTION + ["seed_contexts"]  # the chain without the LLM


def seeded_settings(tmp_path, **config):
    settings = load_settings_in(tmp_path, **config)
    settings.seeds_dir.mkdir(parents=True, exist_ok=True)
    return settings


def run(defs, instance, request_or_key, selection=None):
    """Executes a requested run (or one partition) of the seed chain for real."""
    key = getattr(request_or_key, "partition_key", request_or_key)
    tags = getattr(request_or_key, "tags", None)
    job = defs.resolve_job_def("seed_chain")
    result = job.execute_in_process(partition_key=key, instance=instance, tags=tags,
                                    asset_selection=[AssetKey(k) for k in selection] if selection else None)
    assert result.success
    return result


def test_sensor_requests_only_new_and_changed_sources(tmp_path):
    settings = seeded_settings(tmp_path, seed_sources={
        "hub": {"hf_dataset": "Skywork/Skywork-Reward-Preference-80K-v0.2"},  # offline in tests
        "gone": {"path": str(tmp_path / "no-such-file.jsonl")},
        "folder": {"path": str(tmp_path)},  # a directory: cannot be hashed
    })
    sha = {name: write_seed(settings.seeds_dir / f"{name}.jsonl", SLICES[name]) for name in ("a", "b")}
    defs = build_definitions(settings)
    with instance_for_test() as instance:
        # `a` was ingested before the sensor was turned on: its recorded hash matches, no new run
        instance.add_dynamic_partitions(seed_partitions.name, ["a"])
        run(defs, instance, "a", INGESTION)

        first = sensor_tick(defs, instance, None)
        requested = {r.partition_key: r for r in first.run_requests}
        assert set(requested) == {"b", "embedded"}
        assert requested["b"].tags[CHANGE_TAG] == "new" and requested["b"].tags[FINGERPRINT_TAG] == sha["b"]
        assert set(instance.get_dynamic_partitions(seed_partitions.name)) == {"a", "b", "embedded"}
        cursor = json.loads(first.cursor)
        assert cursor["a"] == sha["a"] and cursor["b"] == sha["b"]
        assert not {"hub", "gone", "folder"} & set(cursor)  # not decided: retried next tick

        run(defs, instance, requested["b"], CHEAP)
        second = sensor_tick(defs, instance, first.cursor)
        assert not second.run_requests
        assert "no new or changed seed sources (3 unchanged)" in second.skip_message
        # the unreadable and unreachable sources are named with their reasons, each tick
        assert "'gone'" in second.skip_message and "FileNotFoundError" in second.skip_message
        assert "'folder'" in second.skip_message and "IsADirectoryError" in second.skip_message
        assert "'Skywork/Skywork-Reward-Preference-80K-v0.2' is not reachable" in second.skip_message

        # a's content changes and c appears: exactly those two run, b and embedded do not
        old_a, sha["a"] = sha["a"], write_seed(settings.seeds_dir / "a.jsonl", SLICES["a"][:4] + [94])
        sha["c"] = write_seed(settings.seeds_dir / "c.jsonl", SLICES["c"])
        third = sensor_tick(defs, instance, second.cursor)
        requested = {r.partition_key: r for r in third.run_requests}
        assert set(requested) == {"a", "c"}
        assert requested["a"].tags[CHANGE_TAG] == "changed" and requested["c"].tags[CHANGE_TAG] == "new"
        assert requested["a"].run_key == f"a@{old_a[:16]}->{sha['a'][:16]}"  # a new key, so not deduplicated
        assert [list(r.partition_keys) for r in third.dynamic_partitions_requests] == [["c"]]
        for request in third.run_requests:
            run(defs, instance, request, INGESTION)
        recorded = latest_materialization(instance, AssetKey("seed_conversations"), "a").asset_materialization
        assert recorded.metadata["source_sha256"].value == sha["a"]

        assert not sensor_tick(defs, instance, third.cursor).run_requests
        # the cursor is a cache: with none, the instance's records say everything but embedded is done
        fresh = sensor_tick(defs, instance, None)
        assert [r.partition_key for r in fresh.run_requests] == ["embedded"]


def test_nightly_refresh_targets_only_stale_or_missing_partitions(tmp_path):
    settings = seeded_settings(tmp_path)
    for name in ("a", "b"):
        write_seed(settings.seeds_dir / f"{name}.jsonl", SLICES[name])
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["a", "b"])
    for name in ("a", "b"):
        run(defs, instance, name, CHEAP)

    cursor = None

    def evaluate(day, hour, minute=0, definitions=defs):
        nonlocal cursor
        result = evaluate_automation_conditions(
            defs=definitions, instance=instance, cursor=cursor,
            evaluation_time=datetime(2030, 1, day, hour, minute, tzinfo=UTC))
        cursor = result.cursor
        return result

    def requested(result, key):
        return result.get_requested_partitions(AssetKey(key))

    assert evaluate(1, 2).total_requested == 0  # first evaluation: nothing is "newly" anything
    # before the window: a's file changes and is re-ingested; b is re-ingested unchanged
    write_seed(settings.seeds_dir / "a.jsonl", [94] + SLICES["a"][1:])
    run(defs, instance, "a", INGESTION)
    run(defs, instance, "b", INGESTION)
    assert evaluate(1, 2, 30).total_requested == 0  # stale, but the window is closed

    night = evaluate(1, 3, 1)
    assert requested(night, "seed_conversations") == set()  # up to date
    assert requested(night, "seed_contexts") == {"a"}  # stale: its input's data version changed; b's did not
    assert requested(night, "simulated_branches") == {"a", "b"}  # missing
    assert requested(night, "music_pairs") == {"a", "b"}
    assert requested(night, "eval_items") == {None}
    # the unpartitioned data assets wait until the seed partitions they read exist (separate runs)
    assert requested(night, "deduplicated_pairs") == set() and requested(night, "reward_model") == set()

    assert evaluate(1, 3, 2).total_requested == 0  # requested once a night: a failure is not retried in a loop

    # the nightly run rewrites a's contexts with new data: what depends on them follows in the window
    run(defs, instance, "a", ["seed_contexts"])
    after = evaluate(1, 3, 30)
    assert requested(after, "simulated_branches") == {"a"} and requested(after, "seed_contexts") == set()

    assert evaluate(1, 13).total_requested == 0  # window closed

    # an edited asset (new code version) is stale in every partition, and only that asset is
    edited = Definitions(resources=defs.resources, assets=[a.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version=f"{spec.code_version}-edited")
        if spec.key == AssetKey("seed_contexts") else spec) for a in defs.assets])
    assert evaluate(1, 14, definitions=edited).total_requested == 0
    next_night = evaluate(2, 3, 1, definitions=edited)
    assert requested(next_night, "seed_contexts") == {"a", "b"}
    assert requested(next_night, "seed_conversations") == set()


def nightly_graph(version):
    """A seed-partitioned asset and an unpartitioned one reading every partition (the shape of
    music_pairs -> deduplicated_pairs), with the project's conditions attached the project's way.
    An edit changes both code versions, as the project's lineage code versions do."""

    @asset(name="up", partitions_def=seed_partitions, code_version=version)
    def up(context) -> MaterializeResult:
        return MaterializeResult(data_version=DataVersion(f"{version}:{context.partition_key}"))

    @asset(name="down", deps=["up"], code_version=version)
    def down() -> MaterializeResult:
        return MaterializeResult(data_version=DataVersion("same"))

    return Definitions(assets=with_nightly_refresh([up, down]))


def test_nightly_refresh_runs_a_downstream_asset_once_after_its_due_upstream():
    """After an edit both assets are stale; the partitions of the upstream are refreshed first, and
    the unpartitioned asset is not requested beside them (it would read the old data, then run
    again) but as soon as they have new data, in the same night, once."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["a", "b"])
    old, new = nightly_graph("v1"), nightly_graph("v2")
    for key in ("a", "b"):
        assert materialize([old.resolve_assets_def("up")], partition_key=key, instance=instance).success
    assert materialize([old.resolve_assets_def("up"), old.resolve_assets_def("down")], selection=["down"],
                       instance=instance).success
    cursor = None

    def evaluate(defs, hour, minute=0):
        nonlocal cursor
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                evaluation_time=datetime(2030, 1, 1, hour, minute, tzinfo=UTC))
        cursor = result.cursor
        return {k: result.get_requested_partitions(AssetKey(k)) for k in ("up", "down")}

    assert evaluate(old, 2) == {"up": set(), "down": set()}
    assert evaluate(new, 2, 30) == {"up": set(), "down": set()}  # the edit is seen; the window is closed
    assert evaluate(new, 3, 1) == {"up": {"a", "b"}, "down": set()}
    for key in ("a", "b"):  # what the requested runs do
        assert materialize([new.resolve_assets_def("up")], partition_key=key, instance=instance).success
    assert evaluate(new, 3, 10) == {"up": set(), "down": {None}}
    assert evaluate(new, 3, 11) == {"up": set(), "down": set()}


TINY = short_tiny_simulation(max_contexts=2)


def engine_work(instance, partition):
    """(materializations of simulated_branches[partition], engine requests they made in total)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("simulated_branches"), asset_partitions=[partition]), limit=100).records
    return len(records), sum(r.asset_materialization.metadata["engine_requests"].value for r in records)


@pytest.mark.slow
def test_new_source_runs_only_its_chain_with_a_real_llm(tmp_path):
    """The sensor's requests executed in full with vLLM (tiny Llama): a new file generates for its
    partition only; a changed file re-runs its chain, and generation resumes (no engine request)
    where the simulated contexts are the same."""
    settings = seeded_settings(tmp_path, **TINY)
    write_seed(settings.seeds_dir / "a.jsonl", SLICES["a"])
    defs = build_definitions(settings)
    with instance_for_test() as instance:
        first = sensor_tick(defs, instance, None)
        run(defs, instance, next(r for r in first.run_requests if r.partition_key == "a"))
        materializations, a_requests = engine_work(instance, "a")
        assert materializations == 1 and a_requests > 0

        write_seed(settings.seeds_dir / "b.jsonl", SLICES["b"])
        second = sensor_tick(defs, instance, first.cursor)
        assert [r.partition_key for r in second.run_requests] == ["b"]
        run(defs, instance, second.run_requests[0])
        assert engine_work(instance, "a") == (1, a_requests)  # a was not regenerated
        b_count, b_requests = engine_work(instance, "b")
        assert b_count == 1 and b_requests > 0

        con = duckdb.connect(str(settings.duckdb_path), read_only=True)
        before = con.execute("SELECT turn_key, created_at FROM music.simulated_branches WHERE source = 'a' ORDER BY 1").fetchall()
        con.close()
        # the last row of a changes: the file re-runs; the two sampled pairs (the contexts: a/3 and a/1) do not change
        write_seed(settings.seeds_dir / "a.jsonl", SLICES["a"][:4] + [94])
        third = sensor_tick(defs, instance, second.cursor)
        assert [(r.partition_key, r.tags[CHANGE_TAG]) for r in third.run_requests] == [("a", "changed")]
        result = run(defs, instance, third.run_requests[0])
        sim = result.asset_materializations_for_node("simulated_branches")[0].metadata
        assert sim["engine_requests"].value == 0 and sim["turns_resumed"].value == len(before)
        con = duckdb.connect(str(settings.duckdb_path), read_only=True)
        after = con.execute("SELECT turn_key, created_at FROM music.simulated_branches WHERE source = 'a' ORDER BY 1").fetchall()
        con.close()
        assert after == before
        assert not sensor_tick(defs, instance, third.cursor).run_requests
