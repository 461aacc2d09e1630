"""Sharded seed sources (`shards: K`): a source as K partitions by a hash of the pair id.

The partition of the rows is checked on real UltraFeedback rows against the unsharded ingest; the
sensor, the refusal of a shard-count change and two shards' ingestion and contexts under a real
`dagster.materialize` into a real DuckDB file run against the real catalog and definitions.
"""

import json

import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from music_assets.assembly import build_definitions, build_resources
from music_assets.common.config import ConfigError
from music_assets.common.partitions import seed_partitions
from music_assets.lineage import shard_warnings
from music_assets.seeds.assets import seed_ingestion
from music_assets.seeds.ingest import ingest
from music_assets.seeds.shards import Shard, shard_number, split_partition_key
from music_assets.simulation.assets import seed_contexts
from tests.helpers import UF, load_settings_in, query, sensor_tick, short_tiny_simulation

KEYS = ["uf/shard-001-of-003", "uf/shard-002-of-003", "uf/shard-003-of-003"]


def _catalog(tmp_path, path=UF, shards=3, **config):
    settings = load_settings_in(tmp_path, seed_sources={"uf": {"path": str(path), "shards": shards}}, **config)
    return settings, build_resources(settings)["seed_catalog"]


def _rows(result):
    """Pairs and quarantine rows keyed by pair id / row number, without the partition column."""
    pairs = {p["pair_id"]: {k: v for k, v in p.items() if k != "source"} for p in result.pairs}
    quarantine = {q["row_number"]: {k: v for k, v in q.items() if k != "source"} for q in result.quarantine}
    return pairs, quarantine


def test_shards_partition_the_source_exactly(tmp_path):
    settings, catalog = _catalog(tmp_path)
    assert catalog.partition_keys("uf") == KEYS
    assert split_partition_key(KEYS[1]) == ("uf", Shard(2, 3)) and split_partition_key("uf") == ("uf", None)
    whole = _rows(ingest(catalog.source("uf")))  # the same source, unsharded
    seen_pairs, seen_quarantine = {}, {}
    for key in KEYS:
        result = ingest(catalog.resolve(key))
        assert {p["source"] for p in result.pairs + result.quarantine} == {key}  # the column is the partition
        pairs, quarantine = _rows(result)
        assert not set(pairs) & set(seen_pairs) and not set(quarantine) & set(seen_quarantine)  # in one shard only
        assert all(shard_number(pid, 3) == int(key[-10:-7]) for pid in pairs)
        assert 40 < len(pairs) < 100  # the hash spreads the 199 pairs
        seen_pairs.update(pairs)
        seen_quarantine.update(quarantine)
    assert seen_pairs == whole[0] and len(seen_pairs) == 199  # the union is the unsharded ingest, row for row
    assert seen_quarantine == whole[1] and len(seen_quarantine) == 1


def test_a_grown_file_keeps_old_rows_in_their_shards(tmp_path):
    lines = UF.read_text().splitlines(keepends=True)
    path = tmp_path / "grows.jsonl"
    path.write_text("".join(lines[:120]))
    _, catalog = _catalog(tmp_path, path)
    before = {key: _rows(ingest(catalog.resolve(key)))[0] for key in KEYS}
    path.write_text("".join(lines))  # 80 rows appended
    after = {key: _rows(ingest(catalog.resolve(key)))[0] for key in KEYS}
    for key in KEYS:
        assert before[key].items() <= after[key].items()  # every old row still there, unchanged
        assert len(after[key]) > len(before[key])  # and the new rows spread over every shard
    assert sum(map(len, after.values())) == 199


def test_changing_the_shard_count_is_refused(tmp_path):
    from music_assets.cli import register_sources

    _, catalog = _catalog(tmp_path, shards=4)
    why = catalog.shard_conflicts(KEYS + ["embedded"])
    assert list(why) == ["uf"]
    assert "made with shards: 3" in why["uf"] and "config says shards: 4" in why["uf"]
    assert "set shards back to 3" in why["uf"]
    with pytest.raises(ValueError, match="config says shards: 4"):
        catalog.resolve(KEYS[0])
    with pytest.raises(ValueError, match="made with shards: 1"):  # unsharded before: refused too
        catalog.resolve("uf")
    assert "made with shards: 1" in catalog.shard_conflicts(["uf"])["uf"]

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, KEYS)
    with pytest.raises(ConfigError, match="config says shards: 4"):
        register_sources(instance, catalog)
    assert sorted(instance.get_dynamic_partitions(seed_partitions.name)) == KEYS  # nothing added


def test_sensor_registers_every_shard_and_two_shards_materialize(tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text(UF.read_text())
    settings, _ = _catalog(tmp_path, path, **short_tiny_simulation(5))
    defs, resources = build_definitions(settings), build_resources(settings)
    with instance_for_test() as instance:
        first = sensor_tick(defs, instance, None)
        assert sorted(r.partition_key for r in first.run_requests) == ["embedded"] + KEYS  # one run per shard
        assert sorted(instance.get_dynamic_partitions(seed_partitions.name)) == ["embedded"] + KEYS
        assert set(json.loads(first.cursor)) == {"embedded", *KEYS}

        for key in KEYS[:2]:
            result = materialize([seed_ingestion, seed_contexts], partition_key=key, instance=instance,
                                 resources=resources)
            assert result.success
            meta = result.asset_materializations_for_node("seed_ingestion")[0].metadata
            assert meta["shard"].value == f"{key[-10:-7].lstrip('0')} of 3"
        per_shard = dict(query(settings, "SELECT source, count(*) FROM music.seed_conversations GROUP BY 1"))
        assert per_shard == {key: len(ingest(resources["seed_catalog"].resolve(key)).pairs) for key in KEYS[:2]}
        # max_contexts (5) is per source: the shards take 2 and 2 of it (the third would take 1)
        contexts = dict(query(settings, "SELECT source, count(*) FROM music.seed_contexts GROUP BY 1"))
        assert contexts == {KEYS[0]: 2, KEYS[1]: 2}
        pairs_of_contexts = query(settings, "SELECT c.source = s.source FROM music.seed_contexts c "
                                            "JOIN music.seed_conversations s USING (pair_id)")
        assert pairs_of_contexts and all(same for same, in pairs_of_contexts)

        # without a cursor, each shard is judged by what its own ingestion recorded
        fresh = sensor_tick(defs, instance, None)
        assert sorted(r.partition_key for r in fresh.run_requests) == ["embedded", KEYS[2]]
        # the file grows: every shard gets new rows, so every shard reruns
        path.write_text(UF.read_text() + UF.read_text().splitlines(keepends=True)[0])
        grown = sensor_tick(defs, instance, first.cursor)
        assert sorted(r.partition_key for r in grown.run_requests) == KEYS

        # a changed shard count: the sensor skips the source with the reason, and runs nothing for it
        resharded = load_settings_in(tmp_path, seed_sources={"uf": {"path": str(path), "shards": 2}})
        refused = sensor_tick(build_definitions(resharded), instance, first.cursor)
        assert not refused.run_requests
        assert "'uf'" in refused.skip_message and "config says shards: 2" in refused.skip_message


def test_lineage_warns_about_incomplete_or_mixed_shards():
    def shard(n, sha):
        return {"source": f"uf/shard-00{n}-of-003", "source_name": "uf", "shard": [n, 3], "sha256": sha,
                "location": "uf.jsonl"}

    assert shard_warnings([shard(1, "a" * 64), shard(2, "a" * 64), shard(3, "a" * 64)]) == []
    warnings = shard_warnings([shard(1, "a" * 64), shard(2, "b" * 64)])
    assert "1 of its 3 shards were not ingested before training (uf/shard-003-of-003)" in warnings[0]
    assert "2 different versions of uf.jsonl" in warnings[1]
