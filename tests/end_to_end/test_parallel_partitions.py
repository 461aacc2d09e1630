"""Three seed partitions materialized at the same time, as three Dagster runs on the multiprocess
executor against one DuckDB file, finish without DuckDB lock errors: every DuckDB writer is in
the `duckdb_writers` pool, and the instance (as the demo writes its dagster.yaml) limits pools to
one step at a time."""

import json
import os
import subprocess
import sys
import time

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance

from music_assets.cli import ensure_instance_config
from music_assets.common.partitions import seed_partitions
from tests.helpers import REPO, load_settings_in

pytestmark = pytest.mark.slow

SOURCES = ("uf_a", "uf_b", "uf_c")
SELECTION = "seed_conversations,seed_quarantine,seed_contexts"


def test_three_partitions_in_parallel_without_lock_errors(tmp_path, real_data):
    rows = (real_data / "ultrafeedback" / "eval_clean.jsonl").read_text().splitlines()
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i, name in enumerate(SOURCES):  # three different slices, 30 pairs each
        (seeds / f"{name}.jsonl").write_text("\n".join(rows[30 * i : 30 * (i + 1)]) + "\n")
    settings = load_settings_in(tmp_path, seeds_dir=str(seeds), simulation={"max_contexts": 10})
    home = tmp_path / "dagster_home"
    ensure_instance_config(home)
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(seed_partitions.name, list(SOURCES))

    env = {**os.environ, "DAGSTER_HOME": str(home), "MUSIC_CONFIG": str(settings.config_path)}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "music_assets.definitions",
         "--select", SELECTION, "--partition", name],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in SOURCES}
    logs = {}
    deadline = time.monotonic() + 600
    for name, proc in procs.items():
        logs[name], _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        assert proc.returncode == 0, f"{name}:\n{logs[name][-3000:]}"
    for name, log in logs.items():
        for error in ("Could not set lock", "Conflicting lock", "IO Error"):  # DuckDB's lock failures
            assert error not in log, f"{name} hit a DuckDB lock:\n{log[-3000:]}"
        assert "multiprocess executor" in log  # each run's steps ran in their own processes
    # the runs really overlapped, and the pool made a writer wait instead of failing
    assert any("blocked by limit for pool duckdb_writers" in log for log in logs.values())

    # the pool limit was in force, and every partition of every asset is materialized
    assert instance.event_log_storage.get_pool_config().default_pool_limit == 1
    for key in ("seed_conversations", "seed_contexts"):
        done = instance.get_materialized_partitions(AssetKey(key))
        assert done == set(SOURCES), (key, done)
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    try:
        counts = dict(con.execute("SELECT source, count(*) FROM (SELECT source FROM music.seed_conversations UNION ALL "
                                  "SELECT source FROM music.seed_quarantine) GROUP BY 1").fetchall())
        contexts = dict(con.execute("SELECT source, count(*) FROM music.seed_contexts GROUP BY 1").fetchall())
    finally:
        con.close()
    assert counts == {name: 30 for name in SOURCES}, json.dumps(counts)  # every row normalized or quarantined
    assert contexts == {name: 10 for name in SOURCES}, json.dumps(contexts)
