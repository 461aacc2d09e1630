"""The same SQL on both warehouse backends: the embedded DuckDB file and DuckLake with its catalog
on a real Postgres (started on loopback by conftest.py). DuckLake has no primary keys, so the
statements that relied on them (INSERT OR IGNORE, INSERT OR REPLACE) keep their keys themselves:
a turn or a drop committed twice is there once, a partition's run recorded twice is one row, and
the IO manager replaces a partition's rows instead of adding to them."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import StaticPartitionsDefinition, asset, build_init_resource_context, materialize

from music_assets.common.tables import SCHEMA, frame, sql
from music_assets.simulation.assets import DuckDBTurnStore
from resources.warehouse import DuckLake, Warehouse, WarehouseIOManager

PARTS = StaticPartitionsDefinition(["a", "b"])


@pytest.fixture(params=["duckdb", "ducklake"])
def warehouse(request, tmp_path) -> dict:
    """The fields of the warehouse resources for one backend, on a fresh warehouse."""
    if request.param == "duckdb":
        return {"database": str(tmp_path / "warehouse.duckdb")}
    postgres = request.getfixturevalue("postgres")
    catalog = postgres.create_database(f"lake_{tmp_path.name.lower().replace('-', '_')[-40:]}")
    lake = DuckLake(catalog=f"postgres:{catalog}", data_path=str(tmp_path / "lake"))
    return {"database": ":memory:", "ducklake": lake}


def _turn(context_id: str, turn: int, text: str) -> dict:
    return {"turn_key": f"{context_id}/{turn}", "generation_key": "g", "source": "a", "context_id": context_id,
            "branch": "shared", "turn": turn, "contrast_turn": 2, "user_message": "u", "assistant_message": text,
            "modified_instruction": None, "user_attempts": 1, "assistant_attempts": 1, "user_tokens": 3,
            "assistant_tokens": 4, "user_finish": "stop", "assistant_finish": "stop"}


def _drop(context_id: str, reason: str) -> dict:
    return {"generation_key": "g", "source": "a", "context_id": context_id, "turn": 1, "stage": "user",
            "reason": reason, "last_output": ""}


@asset(partitions_def=PARTS, metadata={"partition_expr": "source"}, key="seed_contexts")
def contexts_of(context) -> pl.DataFrame:
    part = context.partition_key
    return frame("seed_contexts", [{"source": part, "context_id": f"{part}{i}", "pair_id": "p", "k": 1,
                                    "messages": [{"role": "user", "content": "hi"}]} for i in range(3)])


def test_the_keyed_writes_keep_their_keys(warehouse):
    resource = Warehouse(**warehouse)
    resource.setup_for_execution(build_init_resource_context())  # creates the schema, as at a step's start
    store = DuckDBTurnStore(resource, "a", "g")
    store.commit([_turn("c1", 1, "first"), _turn("c1", 2, "second")], [_drop("c2", "empty")])
    store.commit([_turn("c1", 2, "again"), _turn("c3", 1, "new")], [_drop("c2", "truncated")])  # a resumed attempt
    rows, drops = store.load()
    assert sorted((r["context_id"], r["turn"], r["assistant_message"]) for r in rows) == [
        ("c1", 1, "first"), ("c1", 2, "second"), ("c3", 1, "new")]  # the first commit of a turn key wins
    assert [(d["context_id"], d["reason"]) for d in drops] == [("c2", "empty")]
    run = {"source": "a", "generation_key": "g", "prompt_version": "p1", "models": "{}", "settings": "{}"}
    with resource.get_connection() as con:
        con.execute(sql("simulation/simulation_record_run"), run)
        con.execute(sql("simulation/simulation_record_run"), {**run, "generation_key": "g2"})
        assert con.execute(f"SELECT source, generation_key FROM {SCHEMA}.simulation_runs").fetchall() == [("a", "g2")]
        stamped = con.execute(f"SELECT count(*) FROM {SCHEMA}.simulated_branches WHERE created_at IS NOT NULL")
        assert stamped.fetchone()[0] == 3


def test_the_io_manager_replaces_a_partition(warehouse):
    resources = {"io_manager": WarehouseIOManager(**warehouse, schema=SCHEMA)}
    for key in ("a", "b", "a"):
        assert materialize([contexts_of], partition_key=key, resources=resources).success
    with Warehouse(**warehouse).get_connection() as con:
        counts = dict(con.execute(f"SELECT source, count(*) FROM {SCHEMA}.seed_contexts GROUP BY 1").fetchall())
    assert counts == {"a": 3, "b": 3}


def test_a_missing_extension_package_is_named_with_its_install_line(tmp_path, monkeypatch):
    """No extension is ever downloaded: without the package's files, the error says which to install."""
    monkeypatch.setattr("resources.warehouse.extension_directory", lambda: tmp_path)
    lake = Warehouse(database=":memory:", ducklake=DuckLake(catalog="postgres:dbname=none", data_path=str(tmp_path)))
    with pytest.raises(RuntimeError, match=r"pip install duckdb-ext-ducklake==1\.4\.4\.\*"):
        with lake.get_connection():
            pass


def test_the_lineage_audit_reads_the_warehouse_it_is_configured_with(warehouse, tmp_path):
    """`music-assets lineage` counts pairs from the warehouse: the DuckDB file read-only, or the lake."""
    from music_assets.lineage import _read_connection, warehouse_name
    from music_assets.settings import load_settings

    backend = {"backend": "ducklake", **warehouse["ducklake"].model_dump()} if "ducklake" in warehouse else None
    settings = load_settings(None, environ={"MUSIC_HOME": str(tmp_path / "home")},
                             flags={"duckdb_path": warehouse["database"]} if backend is None else {"warehouse": backend})
    Warehouse(**warehouse).setup_for_execution(build_init_resource_context())  # the schema, as a step's set-up
    con = _read_connection(settings)
    try:
        tables = {name for name, in con.execute(sql("lineage/lineage_tables")).fetchall()}
    finally:
        con.close()
    assert {"training_splits", "music_pairs", "simulated_branches"} <= tables
    assert warehouse_name(settings).startswith("DuckLake" if backend else "DuckDB")


def test_the_io_manager_waits_for_a_reader_holding_the_file(tmp_path):
    """A reader in another process (the UI, the lineage audit, a test polling the file) holding the
    DuckDB file when a step's IO manager starts: the IO manager waits for it, as dagster-duckdb's own
    connections do, instead of failing the run on the lock."""
    import subprocess
    import sys

    import duckdb

    path = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(path)).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1], "
                               "read_only=True); print('held', flush=True); time.sleep(2)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(duckdb.IOException, match="lock"):  # what a bare connect meets meanwhile
            duckdb.connect(str(path)).close()
        WarehouseIOManager(database=str(path), schema=SCHEMA).create_io_manager(build_init_resource_context())
    finally:
        holder.kill()
        holder.wait()
    assert ("music", "seed_conversations") in duckdb.connect(str(path), read_only=True).execute(
        "SELECT schema_name, table_name FROM duckdb_tables()").fetchall()
