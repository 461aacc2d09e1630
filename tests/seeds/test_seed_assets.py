"""The ingestion assets under real Dagster: definitions load, partitions materialize into a real
DuckDB file, quarantine rows land, the blocking check guards the quarantined share."""

import os
import subprocess
import sys

import duckdb
from dagster import DagsterInstance, materialize

from music_assets.assembly import build_definitions, build_resources
from music_assets.common.partitions import seed_partitions
from music_assets.seeds.assets import seed_ingestion
from tests.helpers import REPO, load_settings_in


def _materialize(settings, key, **kw):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, [key])
    return materialize([seed_ingestion], partition_key=key, instance=instance, resources=build_resources(settings), **kw)


def test_definitions_validate_with_dagster_cli(tmp_path):
    env = {**os.environ, "MUSIC_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    defs = build_definitions(load_settings_in(tmp_path))
    assert defs.resolve_asset_graph().get_all_asset_keys()


def test_materialize_partitions_into_duckdb(tmp_path, real_data):
    settings = load_settings_in(
        tmp_path,
        seed_sources={
            "uf": {"path": str(real_data / "ultrafeedback" / "eval_clean.jsonl")},
            "llmbar": {"path": str(real_data / "llmbar" / "natural.json"), "format": "llmbar"},
        },
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["uf", "llmbar"])
    resources = build_resources(settings)
    for key in ("uf", "llmbar", "uf"):  # re-materializing a partition replaces it, no duplicates
        result = materialize([seed_ingestion], partition_key=key, instance=instance, resources=resources)
        assert result.success

    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    counts = dict(con.execute("SELECT source, count(*) FROM music.seed_conversations GROUP BY 1").fetchall())
    assert counts == {"uf": 199, "llmbar": 100}
    quarantined = con.execute("SELECT source, row_number, rule FROM music.seed_quarantine").fetchall()
    assert len(quarantined) == 1 and quarantined[0][0] == "uf" and quarantined[0][2] == "identical_sides"
    # message lists are native DuckDB lists of structs
    role, = con.execute(
        "SELECT chosen[1].role FROM music.seed_conversations WHERE pair_id = 'llmbar/1'"
    ).fetchone()
    assert role == "user"

    mat = result.asset_materializations_for_node("seed_ingestion")
    meta = {m.asset_key.path[-1]: m.metadata for m in mat}
    assert meta["seed_conversations"]["dagster/row_count"].value == 199
    assert meta["seed_conversations"]["rows_quarantined"].value == 1
    assert meta["seed_conversations"]["quarantine_reasons"].value == {"identical_sides": 1}
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"quarantine_share_within_limit": True, "has_rows": True}


def test_quarantine_share_check_blocks_downstream(tmp_path):
    bad = tmp_path / "mostly_bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"nope": 1}\n{"prompt": "q"}\n')
    settings = load_settings_in(
        tmp_path, seed_sources={"mostly_bad": {"path": str(bad)}}, ingest={"max_quarantine_share": 0.5}
    )
    result = _materialize(settings, "mostly_bad", raise_on_error=False)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["quarantine_share_within_limit"].passed
    assert "2 of 3 rows quarantined" in checks["quarantine_share_within_limit"].description
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    rules = sorted(r for r, in con.execute("SELECT rule FROM music.seed_quarantine").fetchall())
    assert rules == ["missing_field", "unrecognized_shape"]


def test_unreadable_file_fails_the_run_naming_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    settings = load_settings_in(tmp_path, seed_sources={"broken": {"path": str(broken)}})
    result = _materialize(settings, "broken", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "broken.json" in str(failure.step_failure_data.error.message) or "broken.json" in str(
        failure.step_failure_data.error.cause
    )


def test_seeds_dir_file_becomes_a_source(tmp_path, real_data):
    settings = load_settings_in(tmp_path)
    settings.seeds_dir.mkdir(parents=True)
    (settings.seeds_dir / "My LLMBar.json").write_bytes((real_data / "llmbar" / "natural.json").read_bytes())
    catalog = build_resources(settings)["seed_catalog"]
    assert "my_llmbar" in catalog.names()
    assert _materialize(settings, "my_llmbar").success


def test_the_warehouse_resources_create_the_schema_before_any_asset_code(tmp_path):
    """The embedded seeds quarantine nothing, so the IO manager writes no seed_quarantine rows:
    the table exists with its declared types only because the warehouse created the schema (and
    every other stage's tables with it) when the step started. Asset code creates no tables."""
    import re

    from music_assets.common.tables import SCHEMA, polars_schema, sql_dir

    settings = load_settings_in(tmp_path)
    assert _materialize(settings, "embedded").success
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM music.seed_quarantine").fetchone() == (0,)
        declared = sorted(re.findall(rf"CREATE TABLE IF NOT EXISTS {SCHEMA}\.(\w+)",
                                     "".join(p.read_text() for p in sql_dir().glob("*/schema.sql"))))
        tables = sorted(r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [SCHEMA]).fetchall())
        assert declared and tables == declared
        assert con.execute("SELECT * FROM music.seed_quarantine LIMIT 0").pl().schema == polars_schema("seed_quarantine")
    finally:
        con.close()
    asset_code = [p for p in (REPO / "music_assets").rglob("*assets.py")]
    assert asset_code and not [p.name for p in asset_code if "create_schema" in p.read_text()]
