"""The real UI: `dagster dev -w workspace.yaml` on 127.0.0.1 with a temp DAGSTER_HOME, driven over
GraphQL, checked in headless Chromium, and shut down with SIGINT to its process group.

What it shows, through Dagster's own GraphQL API (not by reading our code):
- a materialization launched over GraphQL runs (queued, dequeued by the daemon) and its
  materializations (row counts) and staleness read back;
- with the whole graph materialized, editing the contrastive prompt template (in a
  `simulation.prompts_dir` folder) and reloading the code location marks `simulated_branches` and
  every asset downstream of it unsynced, per partition, and nothing upstream;
- changing only the `training:` options marks `reward_model` and what follows, nothing before it;
- the asset-graph page renders our assets in Chromium (the screenshot is kept as a CI artifact).

The graph below the ingestion run is materialized in this process with `dagster.materialize` into
the same instance (one in-process vLLM engine for the simulation, Best-of-N and the judge) on the
tiny Llama and a 3-step MiniLM reward model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow

LOCATION = "music_assets"  # workspace.yaml's location_name
REPOSITORY = "__repository__"  # the repository a Definitions object becomes
ARTIFACTS = Path(os.environ.get("MUSIC_TEST_ARTIFACTS") or REPO / "test-artifacts")
DAGSTER = Path(sys.executable).parent / "dagster"

SEED = "embedded"
VARIANTS = ("baseline", "music")
UPSTREAM_OF_SIMULATION = ["seed_conversations", "seed_quarantine", "seed_contexts"]
SIMULATION_AND_AFTER = ["simulated_branches", "music_pairs"]
DATA = ["eval_items", "deduplicated_pairs", "training_splits"]
TRAINING_AND_AFTER = ["reward_model", "rm_evaluation", "best_of_n", "judge_agreement", "evaluation_report"]
ALL_ASSETS = UPSTREAM_OF_SIMULATION + SIMULATION_AND_AFTER + DATA + TRAINING_AND_AFTER
PER_VARIANT = ("reward_model", "rm_evaluation")
# Every materialized (asset, partition): seed assets per seed source, reward models per variant.
ASSET_PARTITIONS = ({(k, SEED) for k in UPSTREAM_OF_SIMULATION + SIMULATION_AND_AFTER}
                    | {(k, v) for k in PER_VARIANT for v in VARIANTS}
                    | {(k, None) for k in DATA + TRAINING_AND_AFTER if k not in PER_VARIANT})

CONFIG = {
    "models": {"default": {"backend": "vllm", "model": "builtin:tiny-llama"}},
    "compute": {"max_model_len": 2048},
    "simulation": {"max_contexts": 4, "turns": 2,
                   "user_sampling": {"max_tokens": 32, "temperature": 0.8},
                   "assistant_sampling": {"max_tokens": 32, "temperature": 0.8},
                   "rewrite_sampling": {"max_tokens": 32, "temperature": 0.8}},
    "training": {"options": {"backbone": "builtin:minilm", "chat_template": "plain", "max_length": 48,
                             "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-4, "max_steps": 3,
                             "eval_every": 0, "log_every": 1}},
    "evaluation": {"best_of_n": [2], "turns": 1, "contexts_per_source": 2, "agreement_pairs": 2,
                   "bootstrap_samples": 100, "policy_sampling": {"max_tokens": 16},
                   "user_sampling": {"max_tokens": 16},
                   "judge_sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0}},
}

# Flags that keep Chromium from calling home: this network refuses those connections.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]


class Server:
    """A running `dagster dev` and what the tests need to talk to it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "dagster_home"
        self.config = tmp / "music.yaml"
        self.prompts = tmp / "prompts"  # simulation.prompts_dir: empty = the packaged templates
        self.log = tmp / "dagster-dev.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.ingest_run_id: str | None = None

    # --- process -------------------------------------------------------------------------------
    def start(self) -> None:
        self.home.mkdir(parents=True)
        (self.home / "dagster.yaml").write_text("")  # Dagster's defaults, all under DAGSTER_HOME
        self.prompts.mkdir()
        self.write_config(CONFIG)
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "MUSIC_CONFIG": str(self.config),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        env.pop("MUSIC_HOME", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(DAGSTER), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: webserver, daemon, code server
                # Ctrl-C's signal must reach it even when pytest runs as a background job: a shell
                # starts those with SIGINT ignored, and an ignored signal stays ignored across exec.
                preexec_fn=_default_sigint)
        deadline = time.time() + 240
        while time.time() < deadline:
            self._check_alive()
            try:
                if requests.get(f"{self.url}/server_info", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"dagster dev did not answer /server_info within 240 s\n{self.log_tail()}")
        self.wait_loaded()
        self.gql("mutation { setNuxSeen }")  # the first-visit dialog a user skips; it would hide the graph

    def stop(self, timeout: float = 60) -> int | None:
        """SIGINT to the whole process group (what Ctrl-C does): `dagster dev`, the webserver, the
        daemon and the code servers must all be gone within `timeout`, else they are SIGKILLed and
        this raises. Returns `dagster dev`'s exit code."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group is named after its leader
        deadline = time.time() + timeout
        if self.proc.poll() is None and _group_alive(pgid):
            os.killpg(pgid, signal.SIGINT)
        while _group_alive(pgid) and time.time() < deadline:
            self.proc.poll()  # reap the leader once it exits
            time.sleep(0.5)
        left = _group_alive(pgid)
        if left:
            survivors = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(pgid)], capture_output=True, text=True).stdout
            os.killpg(pgid, signal.SIGKILL)
        code = self.proc.wait()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.log, ARTIFACTS / "dagster-dev.log")
        if left:
            raise AssertionError(f"dagster dev's process group outlived SIGINT by {timeout} s (killed); left:\n"
                                 f"{survivors}\n{self.log_tail()}")
        return code

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {self.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    # --- GraphQL ---------------------------------------------------------------------------------
    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=300)

    def gql(self, query: str, **variables) -> dict:
        self._check_alive()
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=300)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def wait_loaded(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.gql(LOCATION_QUERY, name=LOCATION)["workspaceLocationEntryOrError"]
            if entry and entry.get("loadStatus") == "LOADED":
                loaded = entry["locationOrLoadError"]
                if loaded["__typename"] == "PythonError":
                    pytest.fail(f"the code location failed to load: {loaded['message']}")
                return
            time.sleep(1)
        pytest.fail(f"the code location did not load within {timeout} s\n{self.log_tail()}")

    def reload(self) -> None:
        """What the UI's "Reload" does: the code server restarts and re-imports the definitions."""
        info = self.client().reload_repository_location(LOCATION)
        assert info.status.value == "SUCCESS", f"reload failed: {info.failure_type} {info.message}"
        self.wait_loaded()

    def staleness(self) -> dict[tuple[str, str | None], tuple[str, list[dict]]]:
        """(asset, partition) -> (stale status, stale causes), as the UI shows them."""
        nodes = self.gql(NODES_QUERY)["assetNodes"]
        out = {}
        for node in nodes:
            key = node["assetKey"]["path"][-1]
            if not node["isPartitioned"]:
                out[(key, None)] = (node["staleStatus"], node["staleCauses"])
                continue
            parts = node["partitionKeys"]
            got = self.gql(PARTITION_STALE_QUERY, keys=[{"path": [key]}], partitions=parts)["assetNodes"][0]
            for part, status, causes in zip(parts, got["staleStatusByPartition"], got["staleCausesByPartition"]):
                out[(key, part)] = (status, causes)
        return out

    def code_versions(self) -> dict[str, str]:
        return {n["assetKey"]["path"][-1]: n["opVersion"] for n in self.gql(NODES_QUERY)["assetNodes"]}

    def write_config(self, config: dict) -> None:
        simulation = {**config.get("simulation", {}), "prompts_dir": str(self.prompts)}
        self.config.write_text(yaml.safe_dump({"home": str(self.tmp / "home"), **config, "simulation": simulation}))


LOCATION_QUERY = """
query Location($name: String!) {
  workspaceLocationEntryOrError(name: $name) {
    __typename
    ... on WorkspaceLocationEntry {
      loadStatus
      locationOrLoadError { __typename ... on PythonError { message } }
    }
  }
}"""

NODES_QUERY = """
query Nodes {
  assetNodes {
    assetKey { path }
    groupName
    opVersion
    isPartitioned
    partitionKeys
    staleStatus
    staleCauses { key { path } partitionKey category reason dependency { path } }
  }
}"""

PARTITION_STALE_QUERY = """
query PartitionStale($keys: [AssetKeyInput!], $partitions: [String!]) {
  assetNodes(assetKeys: $keys) {
    staleStatusByPartition(partitions: $partitions)
    staleCausesByPartition(partitions: $partitions) {
      key { path } partitionKey category reason dependency { path }
    }
  }
}"""

ADD_PARTITION = """
mutation Add($key: String!, $defName: String!, $repo: RepositorySelector!) {
  addDynamicPartition(partitionKey: $key, partitionsDefName: $defName, repositorySelector: $repo) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
  }
}"""

MATERIALIZATIONS = """
query Materializations($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        runId
        partition
        tags { key value }
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
  }
}"""

INSTANCE_AND_REPOSITORY = """
query Health($repo: RepositorySelector!) {
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
  repositoryOrError(repositorySelector: $repo) {
    __typename
    ... on Repository {
      sensors { name sensorState { status } }
      schedules { name scheduleState { status } }
    }
  }
}"""


SENSOR_TICKS = """
query Ticks($sensor: SensorSelector!) {
  sensorOrError(sensorSelector: $sensor) {
    __typename
    ... on Sensor { sensorState { id status ticks(limit: 5) { status skipReason runIds error { message } } } }
  }
}"""

START_SENSOR = """
mutation Start($sensor: SensorSelector!) {
  startSensor(sensorSelector: $sensor) { __typename ... on Sensor { sensorState { id status } } }
}"""

STOP_SENSOR = """
mutation Stop($id: String!) { stopSensor(id: $id) { __typename } }"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _settings(server: Server):
    from music_assets.settings import load_settings

    return load_settings(server.config)


def _materialize_rest_in_process(server: Server) -> None:
    """Everything below the ingestion, into the server's instance, with the definitions' own
    (lineage) code versions: the same versions the code location in `dagster dev` has."""
    from dagster import DagsterInstance, materialize

    from music_assets import assembly as d
    from music_assets.training.assets import reward_variants

    settings = _settings(server)
    resources = d.build_resources(settings)
    everything = d.build_assets(settings)

    def run(keys, partition=None):
        result = materialize(everything, selection=keys, partition_key=partition, instance=instance,
                             resources=resources, raise_on_error=False)
        assert result.success, f"materializing {keys} ({partition}) failed: run {result.run_id}"

    instance = DagsterInstance.from_config(str(server.home))
    try:
        run(["seed_contexts", "simulated_branches", "music_pairs"], SEED)
        run(DATA)
        for variant in reward_variants.get_partition_keys():
            run(["reward_model", "rm_evaluation"], variant)
        run(["best_of_n", "judge_agreement", "evaluation_report"])
    finally:
        instance.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = time.time()
    srv = Server(tmp_path_factory.mktemp("dagster-ui"))
    try:
        srv.start()
        print(f"dagster dev up in {time.time() - started:.0f} s on {srv.url}")
        yield srv
    finally:
        try:
            srv.stop()
        except AssertionError:
            pass  # reported by test_sigint_shuts_the_server_down_cleanly when that test runs


@pytest.fixture(scope="module")
def materialized(server):
    """The ingestion launched over GraphQL, then the rest of the graph in this process."""
    started = time.time()
    repo = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    from music_assets.common.partitions import seed_partitions

    added = server.gql(ADD_PARTITION, key=SEED, defName=seed_partitions.name, repo=repo)["addDynamicPartition"]
    assert added["__typename"] == "AddDynamicPartitionSuccess", added
    client = server.client()
    run_id = client.submit_job_execution("__ASSET_JOB", repository_location_name=LOCATION, repository_name=REPOSITORY,
                                         tags={"dagster/partition": SEED},
                                         asset_selection=["seed_conversations", "seed_quarantine"])
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1)
    assert status == "SUCCESS", f"ingestion run {run_id} ended {status}\n{server.log_tail()}"
    server.ingest_run_id = run_id
    print(f"ingestion run over GraphQL: {time.time() - started:.0f} s")
    _materialize_rest_in_process(server)
    print(f"graph materialized: {time.time() - started:.0f} s")
    return server


def test_graphql_materialization_reads_back_with_row_counts_and_staleness(materialized):
    import duckdb

    server = materialized
    con = duckdb.connect(str(_settings(server).duckdb_path), read_only=True)
    try:
        in_tables = {key: con.execute(f"SELECT count(*) FROM music.{key} WHERE source = ?", [SEED]).fetchone()[0]
                     for key in ("seed_conversations", "seed_quarantine")}
    finally:
        con.close()
    assert in_tables["seed_conversations"] == 72
    for key in ("seed_conversations", "seed_quarantine"):
        mats = server.gql(MATERIALIZATIONS, key={"path": [key]}, partitions=[SEED])["assetOrError"]
        mats = mats["assetMaterializations"]
        assert [m["runId"] for m in mats] == [server.ingest_run_id]  # the run launched over GraphQL
        assert mats[0]["partition"] == SEED
        rows = {e["label"]: e.get("intValue") for e in mats[0]["metadataEntries"]}["dagster/row_count"]
        assert rows == in_tables[key]
        assert any(t["key"] == "dagster/code_version" for t in mats[0]["tags"])
    # Every asset materialized, by the UI's run or this process, is synced: the versions agree.
    stale = server.staleness()
    assert {k: v[0] for k, v in stale.items()} == dict.fromkeys(ASSET_PARTITIONS, "FRESH"), stale


def test_daemon_is_healthy_and_instigators_match_the_definitions(materialized):
    """The daemon runs (it dequeued the ingestion run); sensors and schedules the definitions
    declare are the ones the UI lists."""
    server = materialized
    from music_assets.assembly import build_definitions

    defs = build_definitions(_settings(server))
    repo = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    deadline = time.time() + 60
    while True:
        data = server.gql(INSTANCE_AND_REPOSITORY, repo=repo)
        statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        unhealthy = [s["daemonType"] for s in statuses if s["required"] and not s["healthy"]]
        if not unhealthy or time.time() > deadline:
            break
        time.sleep(2)
    assert not unhealthy, statuses
    assert {"SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR"} <= {s["daemonType"] for s in statuses if s["required"]}
    repository = data["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    assert {s["name"] for s in repository["sensors"]} == {s.name for s in defs.sensors or []}
    assert {s["name"] for s in repository["schedules"]} == {s.name for s in defs.schedules or []}

    # One real daemon tick: started over GraphQL, the seed-folder sensor is evaluated by the
    # daemon; `embedded` was ingested from the same bytes already, so it requests no run.
    sensor = {**repo, "sensorName": "seed_folder_sensor"}
    started = server.gql(START_SENSOR, sensor=sensor)["startSensor"]
    assert started["__typename"] == "Sensor" and started["sensorState"]["status"] == "RUNNING", started
    deadline = time.time() + 120
    try:
        while True:
            ticks = server.gql(SENSOR_TICKS, sensor=sensor)["sensorOrError"]["sensorState"]["ticks"]
            done = [t for t in ticks if t["status"] != "STARTED"]
            if done or time.time() > deadline:
                break
            time.sleep(2)
    finally:
        server.gql(STOP_SENSOR, id=started["sensorState"]["id"])
    assert done, f"the daemon did not tick the sensor within 120 s\n{server.log_tail()}"
    assert done[0]["status"] == "SKIPPED" and not done[0]["runIds"], done[0]


def test_prompt_edit_marks_simulation_and_downstream_unsynced_per_partition(materialized):
    server = materialized
    from music_assets.simulation.prompts import PACKAGED

    before = server.code_versions()
    edited = server.prompts / "contrastive_assistant.txt"
    edited.write_text(PACKAGED.templates["contrastive_assistant"] + "\nKeep the changed request in mind in later answers.\n")
    try:
        server.reload()
        after = server.code_versions()
        assert after["simulated_branches"] != before["simulated_branches"]
        assert after["simulated_branches"].startswith("simulation-")
        stale = server.staleness()
        assert set(stale) == ASSET_PARTITIONS
        upstream = {(k, SEED) for k in UPSTREAM_OF_SIMULATION} | {("eval_items", None)}
        for key in upstream:
            assert stale[key][0] == "FRESH", (key, stale[key])
        for key in ASSET_PARTITIONS - upstream:  # simulated_branches and everything downstream of it
            status, causes = stale[key]
            assert status == "STALE", (key, causes)
            assert {(c["category"], c["reason"]) for c in causes} == {("CODE", "has a new code version")}, causes
        _screenshot(server, "asset-graph-after-prompt-edit", dump_dom=False)  # unsynced marks, for people
    finally:
        edited.unlink()
        server.reload()
    assert server.code_versions() == before  # the packaged templates again: the old versions, synced again


def test_training_config_change_marks_only_reward_models_and_after_unsynced(materialized):
    server = materialized
    before = server.code_versions()
    changed = json.loads(json.dumps(CONFIG))
    changed["training"]["options"]["learning_rate"] = 2e-4
    server.write_config(changed)
    try:
        server.reload()
        after = server.code_versions()
        assert {k for k in after if after[k] != before[k]} == set(TRAINING_AND_AFTER)
        stale = server.staleness()
        assert set(stale) == ASSET_PARTITIONS
        for (key, part), (status, causes) in stale.items():
            if key in TRAINING_AND_AFTER:  # both reward-model variants and everything after them
                assert status == "STALE", (key, part, causes)
                assert {(c["category"], c["reason"]) for c in causes} == {("CODE", "has a new code version")}, causes
            else:
                assert status == "FRESH", (key, part, causes)
    finally:
        server.write_config(CONFIG)
        server.reload()
    assert server.code_versions() == before
    assert {v[0] for v in server.staleness().values()} == {"FRESH"}


def test_asset_graph_page_renders_our_assets_in_chromium(materialized):
    dom = _screenshot(materialized, "asset-graph")
    missing = [name for name in ALL_ASSETS if name not in dom]
    assert not missing, f"the asset-graph page does not show {missing}"


def test_sigint_shuts_the_server_down_cleanly(server):
    started = time.time()
    # Usually 10-15 s. The bound is generous because a code server that a reload replaced a moment
    # earlier exits on its own only when its heartbeat from the (now gone) parent lapses.
    code = server.stop(timeout=120)  # raises, naming the survivors, if any process is left after that
    print(f"dagster dev exited with {code}, its process group {time.time() - started:.1f} s after SIGINT")
    assert code == 0
    assert not _group_alive(server.proc.pid)


def _chromium() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail("chromium is not installed: run scripts/setup.sh (it installs Debian's chromium package)")
    return path


def _screenshot(server: Server, name: str, dump_dom: bool = True) -> str:
    """Screenshot of the global asset graph saved as ARTIFACTS/<name>.png; returns the page's DOM
    as Chromium rendered it (also saved, as <name>.html), or "" without `dump_dom`."""
    chromium = _chromium()
    groups = sorted({n["groupName"] for n in server.gql(NODES_QUERY)["assetNodes"]})
    url = f"{server.url}/asset-groups?expanded=" + ",".join(f"global@global:{g}" for g in groups)  # all groups open
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / f"{name}.png"
    png.unlink(missing_ok=True)
    outputs = {}
    for action in (["--dump-dom"] if dump_dom else []) + [f"--screenshot={png}"]:
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            out = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                  "--virtual-time-budget=30000", action, url],
                                 capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        outputs[action] = out.stdout
    dom = outputs.get("--dump-dom", "")
    if dump_dom:
        (ARTIFACTS / f"{name}.html").write_text(dom)
    from PIL import Image

    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, f"{png}: {len(data)} bytes"
    with Image.open(png) as image:
        assert image.size == (1600, 1000)
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colors is None or len(colors) > 50, f"{png} is nearly blank"
    return dom
