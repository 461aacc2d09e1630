"""The `openai` backend against a real vLLM OpenAI-compatible server on loopback
(`python -m vllm.entrypoints.openai.api_server`), including a server killed mid-run."""

import os
import subprocess
import sys
import time

import duckdb
import pytest
from dagster import DagsterInstance, materialize

from music_assets.assembly import SEED_ASSETS, build_resources
from music_assets.devtools.tiny_llama import tiny_llama_dir
from music_assets.common.partitions import seed_partitions
from tests.engines.servers import VLLMServer
from tests.helpers import REPO, TINY_SIM, free_port, load_settings_in, query

pytestmark = pytest.mark.slow


def run(settings, key="embedded"):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, [key])
    return materialize(SEED_ASSETS, partition_key=key, instance=instance, resources=build_resources(settings),
                       raise_on_error=False)


def settings_for(tmp_path, port, **engine):
    """Settings plus the same config as a YAML file, for a run in a child process."""
    spec = {"backend": "openai", "model": "tiny", "base_url": f"http://127.0.0.1:{port}/v1", "timeout_s": 60, **engine}
    config = {"models": {"default": spec}, "simulation": {**TINY_SIM, "max_contexts": 24, "turns": 3}}
    settings = load_settings_in(tmp_path, **config)
    return settings, settings.config_path


def start_run(config_path, tmp_path):
    """The demo CLI in a child process: the test polls the DuckDB file from this process, which
    DuckDB only allows when the writer is another process."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    log = open(tmp_path / "run.log", "w")
    env = {**os.environ, "MUSIC_CONFIG": str(config_path), "DAGSTER_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "music_assets.cli", "demo", "--skip-training"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_first_turn(settings, child, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if query(settings, "SELECT count(*) FROM music.simulated_branches")[0][0] > 0:
                return
        except (duckdb.IOException, duckdb.CatalogException):  # locked for a moment, or not created yet
            pass
        if child.poll() is not None:
            pytest.fail("the run ended before the server could be killed")
        time.sleep(0.1)
    pytest.fail("no turn committed in time")


def test_openai_backend_against_vllm_server_with_kills(tmp_path):
    """Two runs against one server, killed under both mid-run: with a small retry budget the run
    fails with a clear error (and a rerun resumes from its committed turns); with a generous one
    it rides out the outage and completes. One kill serves both, to start the server only twice."""
    server = VLLMServer(tiny_llama_dir(), free_port())
    server.start()
    try:
        tight, tight_config = settings_for(tmp_path / "tight", server.port, max_retries=1, backoff_s=0.2)
        patient, patient_config = settings_for(tmp_path / "patient", server.port, max_retries=40, backoff_s=2,
                                               backoff_max_s=10)
        tight_child = start_run(tight_config, tmp_path / "tight")
        patient_child = start_run(patient_config, tmp_path / "patient")
        wait_for_first_turn(tight, tight_child)
        wait_for_first_turn(patient, patient_child)
        server.kill()

        # 1. small retry budget: the run fails with a clear error ...
        assert tight_child.wait(timeout=600) != 0
        assert "failed after 2 attempts" in (tmp_path / "tight" / "run.log").read_text()
        committed = query(tight, "SELECT count(*) FROM music.simulated_branches")[0][0]
        assert committed > 0

        # 2. generous retry budget: the server comes back and the run rides the outage out
        server.start()
        assert patient_child.wait(timeout=900) == 0, (tmp_path / "patient" / "run.log").read_text()[-3000:]
        keys = [k for k, in query(patient, "SELECT turn_key FROM music.simulated_branches")]
        assert len(keys) == len(set(keys))
        assert query(patient, "SELECT count(*) FROM music.music_pairs")[0][0] > 0
        assert "retrying in" in (tmp_path / "patient" / "run.log").read_text()  # it did see the outage

        # ... and the failed run, rerun once the server is back, resumes from its committed turns
        resumed = run(tight)
        assert resumed.success
        meta = {m.asset_key.path[-1]: m.metadata for m in resumed.asset_materializations_for_node("simulated_branches")}
        assert meta["simulated_branches"]["turns_resumed"].value == committed
        assert meta["simulated_branches"]["contexts_completed"].value > 0
    finally:
        server.kill()
