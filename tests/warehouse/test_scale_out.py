"""Many writers on one warehouse: three seed partitions simulated at the same time by three
processes (`music-assets demo --skip-training --source X`, each a real `dagster.materialize`), with
the tiny Llama served once by vLLM's OpenAI-compatible server on loopback (as workers would share
an inference endpoint; three in-process engines loading at once took most of 10 minutes on 2
cores), with no pool limit, into DuckLake whose catalog is on a Postgres server started
for the test, under a Dagster instance whose runs and events are in the same Postgres
(deploy/dagster.yaml, as shipped). Afterwards the warehouse holds exactly what each run reported:
every turn it committed, once; a MUSIC pair per completed context; and every blocking check
passed (a failed one would have failed the run)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from music_assets.common.partitions import seed_partitions
from music_assets.model_provisioning import resolve_model
from resources.warehouse import DuckLake, connect_lake
from tests.helpers import REPO, SLICES, free_port, load_settings_in, short_tiny_simulation, write_seed

pytestmark = pytest.mark.slow

SOURCES = {"uf_a": SLICES["a"], "uf_b": SLICES["b"], "uf_c": SLICES["c"]}
CONTEXTS = 3  # per partition
# the simulation's blocking checks (the seed assets' checks run too, and must pass as well)
BLOCKING = {"some_contexts_completed", "rejected_differs_in_two_turns", "private_instruction_not_visible",
            "no_empty_messages"}


def _dagster_home(tmp_path, postgres, db_name: str) -> tuple[str, dict]:
    """A DAGSTER_HOME holding deploy/dagster.yaml as shipped, and the environment it reads."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "DAGSTER_PG_HOST": postgres.host, "DAGSTER_PG_PORT": str(postgres.port),
           "DAGSTER_PG_USER": postgres.user, "DAGSTER_PG_PASSWORD": "unused-trust-auth", "DAGSTER_PG_DB": db_name}
    return str(home), env


@pytest.fixture
def tiny_llama_server():
    """The tiny Llama behind vLLM's OpenAI-compatible server on a free loopback port; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("builtin:tiny-llama"),
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "2048", "--enforce-eager", "--no-enable-chunked-prefill"],  # as compute.py's defaults
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, "the vLLM server exited during start-up"
            assert time.monotonic() < deadline, "the vLLM server did not become ready"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_three_partitions_simulated_at_once_into_ducklake_on_postgres(tmp_path, postgres, monkeypatch,
                                                                      tiny_llama_server):
    catalog = "postgres:" + postgres.create_database("music_lake")
    postgres.create_database("dagster")
    lake = DuckLake(catalog=catalog, data_path=str(tmp_path / "lake"))
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for name, lines in SOURCES.items():
        write_seed(seeds / f"{name}.jsonl", lines)
    engine = {"backend": "openai", "model": "tiny", "base_url": tiny_llama_server, "timeout_s": 60}
    settings = load_settings_in(tmp_path, seeds_dir=str(seeds), warehouse={"backend": "ducklake", **lake.model_dump()},
                                models={"default": engine},
                                simulation=short_tiny_simulation(CONTEXTS)["simulation"])
    home, pg_env = _dagster_home(tmp_path, postgres, "dagster")
    for key, value in pg_env.items():
        monkeypatch.setenv(key, value)
    instance = DagsterInstance.get()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert instance.event_log_storage.get_pool_config().default_pool_limit is None  # no pool limit
    instance.add_dynamic_partitions(seed_partitions.name, list(SOURCES))

    started = time.monotonic()
    procs = {}
    for name in SOURCES:
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "music_assets.cli", "--config", str(settings.config_path), "demo",
                 "--skip-training", "--source", name],
                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=max(1.0, 420 - (time.monotonic() - started)))
            assert rc == 0, f"{name}:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"three writers in {time.monotonic() - started:.0f} s")

    # the runs and their events are in Postgres, and the three overlapped in time
    records = instance.get_run_records()
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == sorted(SOURCES)
    assert {r.dagster_run.status for r in records} == {DagsterRunStatus.SUCCESS}
    assert max(r.start_time for r in records) < min(r.end_time for r in records), "the writers did not overlap"
    reported = {}
    for record in records:
        source = record.dagster_run.tags["dagster/partition"]
        checks = [e.dagster_event.event_specific_data for e in
                  instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
        assert BLOCKING <= {c.check_name for c in checks if c.blocking}, (source, checks)
        assert all(c.passed for c in checks), (source, [c for c in checks if not c.passed])
        for event in instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            mat = event.asset_materialization
            reported[(source, mat.asset_key.to_user_string())] = {k: v.value for k, v in mat.metadata.items()}
    _assert_in_postgres(postgres, "dagster", runs=3)

    con = connect_lake(lake)
    try:
        rows = lambda q: dict(con.execute(q).fetchall())  # noqa: E731
        seeds_per_source = rows("SELECT source, count(*) FROM (SELECT source FROM music.seed_conversations UNION ALL "
                                "SELECT source FROM music.seed_quarantine) GROUP BY source")
        contexts = rows("SELECT source, count(*) FROM music.seed_contexts GROUP BY source")
        turns = rows("SELECT source, count(*) FROM music.simulated_branches GROUP BY source")
        distinct_turns = con.execute("SELECT count(DISTINCT turn_key) FROM music.simulated_branches").fetchone()[0]
        pairs = rows("SELECT source, count(*) FROM music.music_pairs GROUP BY source")
        distinct_pairs = con.execute("SELECT count(DISTINCT pair_id) FROM music.music_pairs").fetchone()[0]
        runs = rows("SELECT source, count(*) FROM music.simulation_runs GROUP BY source")
    finally:
        con.close()
    assert seeds_per_source == {name: len(lines) for name, lines in SOURCES.items()}
    assert contexts == {name: CONTEXTS for name in SOURCES}
    assert distinct_turns == sum(turns.values()), "a turn was written twice"
    assert turns == {s: reported[(s, "simulated_branches")]["turn_rows_committed_this_run"] for s in SOURCES}, \
        "the table does not hold exactly the turns each run committed"
    assert distinct_pairs == sum(pairs.values())
    assert pairs == {s: reported[(s, "simulated_branches")]["contexts_completed"] for s in SOURCES}
    assert all(pairs.values()), pairs
    assert runs == {name: 1 for name in SOURCES}
    assert list((tmp_path / "lake").rglob("*.parquet")), "no data file on the lake's data path"


def _assert_in_postgres(postgres, db_name: str, runs: int) -> None:
    """The instance's tables, read with SQL from the Postgres database itself (no SQLite anywhere)."""
    import psycopg2

    con = psycopg2.connect(host=postgres.host, port=postgres.port, user=postgres.user, dbname=db_name)
    try:
        cur = con.cursor()
        cur.execute("SELECT status, count(*) FROM runs GROUP BY status")
        assert dict(cur.fetchall()) == {"SUCCESS": runs}
        cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cur.fetchone()[0] == runs * 5  # seed_conversations, seed_quarantine, contexts, branches, pairs
    finally:
        con.close()

