"""The simulation on a vLLM fleet: vLLM's own router (`vllm-router`) in front of two real `vllm serve`
replicas of the tiny Llama on loopback, the `openai` backend pointed at the router, each request
naming its context in `X-Session-ID`.

(a) a replica killed mid-run: the router's circuit breaker and health check take it out, and its
    retries (the backend's, for whatever still reaches the client) carry the requests the replica
    dropped over to the other one; the run completes with every turn committed exactly once.
(b) the same run with `consistent_hash` (session affinity) and with `round_robin`: the replicas'
    prefix-cache hit rate (from their /metrics) is higher with affinity, because every turn of a
    context, both branches included, lands on the replica that already holds its prefix.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from dagster import build_init_resource_context

from music_assets.common.engines import Sampling
from music_assets.devtools.tiny_llama import tiny_llama_dir
from music_assets.simulation.assets import DuckDBTurnStore
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import generation_key, simulate
from music_assets.simulation.state import Context
from resources.openai_engine import OpenAIEngine
from resources.warehouse import Warehouse
from tests.engines.servers import VLLMRouter, VLLMServer
from tests.helpers import SLICES, UF, free_port

pytestmark = pytest.mark.slow

SHORT = Sampling(max_tokens=24, temperature=0.8)
SETTINGS = SimulationConfig(turns=3, user_sampling=SHORT, assistant_sampling=SHORT, rewrite_sampling=SHORT)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas, loaded side by side, each bound to a core of its own where there are two.
    Dev mode for POST /reset_prefix_cache, so both runs of (b) start from an empty cache."""
    cores, logs, model = len(os.sched_getaffinity(0)), tmp_path_factory.mktemp("replicas"), tiny_llama_dir()
    servers = [VLLMServer(model, free_port(), log=logs / f"replica-{i}.log",
                          env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(i % cores)})
               for i in range(2)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def fleet(replicas, tmp_path):
    """A router of the requested policy over both replicas (a replica killed by an earlier test is
    started again)."""
    for server in replicas:
        if not server.alive:
            server.start()
    routers = []

    def start(policy: str) -> VLLMRouter:
        router = VLLMRouter(replicas, policy, tmp_path / f"router-{policy}.log")
        routers.append(router)
        router.start()
        return router

    yield start
    for router in routers:
        router.kill()


def contexts() -> list[Context]:
    """Eight short UltraFeedback conversations as seed contexts (one exchange each): enough that
    the hash ring all but surely gives each replica some (all on one: 2 in 2^8)."""
    rows = UF.read_text().splitlines()
    picked = [json.loads(rows[i]) for i in SLICES["a"][:4] + SLICES["b"][:4]]
    return [Context(f"ctx-{i}", "fleet", [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["chosen"]}]) for i, r in enumerate(picked)]


def run_simulation(router: VLLMRouter, tmp_path, on_commit=lambda: None):
    """A real `simulate` against the router, its turns in a DuckDB warehouse; returns the stats and
    the committed turn rows. `on_commit` runs after every commit (the log line of one)."""
    engine = OpenAIEngine(model="tiny", base_url=router.url, timeout_s=30, max_concurrency=8, max_retries=8,
                          backoff_s=0.5, backoff_max_s=4)
    engines = Engines(user=engine, assistant=engine, rewriter=engine)
    tmp_path.mkdir(parents=True, exist_ok=True)
    warehouse = Warehouse(database=str(tmp_path / "warehouse.duckdb"))
    warehouse.setup_for_execution(build_init_resource_context())  # creates the schema, as at a step's start
    store = DuckDBTurnStore(warehouse, "fleet", generation_key(SETTINGS, engines))
    stats = simulate(contexts(), engines, SETTINGS, store, log=lambda _: on_commit())
    with warehouse.get_connection() as con:
        rows = con.execute("SELECT turn_key, context_id, branch, turn, contrast_turn FROM music.simulated_branches")
        columns = [d[0] for d in rows.description]
        return stats, [dict(zip(columns, r)) for r in rows.fetchall()]


def assert_turns_exact(stats, rows):
    """Every turn committed once (the table keeps the first commit of a turn key, so a turn
    generated twice would show as more rows committed than stored), and every context that was not
    dropped has all its turns: the shared ones before its contrast turn c, then a chosen and a
    rejected one for each turn from c on."""
    assert len(rows) == len({r["turn_key"] for r in rows}) == stats.committed_rows
    assert stats.completed + sum(stats.dropped.values()) == stats.contexts
    assert stats.completed > 0
    by_context: dict[str, set] = {}
    for r in rows:
        by_context.setdefault(r["context_id"], set()).add((r["branch"], r["turn"], r["contrast_turn"]))
    finished = 0
    for turns in by_context.values():
        c = next(iter(turns))[2]
        expected = {("shared", t, c) for t in range(1, c)} | {(b, t, c) for t in range(c, SETTINGS.turns + 1)
                                                               for b in ("chosen", "rejected")}
        assert turns <= expected
        finished += turns == expected
    assert finished == stats.completed


CACHE_COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")  # in tokens


def cache_counters(replicas) -> list[list[float]]:
    return [[server.metric(name) for name in CACHE_COUNTERS] for server in replicas]


def hit_rate(before, after) -> tuple[float, list[float]]:
    """The fleet's prefix-cache hit rate between two readings (cached tokens / queried tokens, both
    replicas together), and the share of the queried tokens each replica saw."""
    hits, queries = ([a[i] - b[i] for a, b in zip(after, before)] for i in (0, 1))
    return sum(hits) / sum(queries), [round(q / sum(queries), 2) for q in queries]


def answered(server: VLLMServer) -> float:
    return server.metric("vllm:request_success_total")


def test_session_affinity_raises_the_prefix_cache_hit_rate(fleet, replicas, tmp_path):
    rates = {}
    for policy in ("consistent_hash", "round_robin"):
        router = fleet(policy)
        for server in replicas:
            server.reset_prefix_cache()  # both runs start from empty caches
        before, started = cache_counters(replicas), time.perf_counter()
        stats, _ = run_simulation(router, tmp_path / policy)
        rates[policy], shares = hit_rate(before, cache_counters(replicas))
        print(f"{policy}: prefix-cache hit rate {rates[policy]:.3f}, queried tokens per replica {shares}, "
              f"{stats.requests} requests, {time.perf_counter() - started:.0f}s")
        router.kill()
        if policy == "consistent_hash":  # without sessions to hash, it sends everything to one replica
            assert min(shares) > 0, f"consistent_hash left a replica idle: {shares}"
    assert rates["consistent_hash"] > rates["round_robin"]


def test_a_replica_killed_mid_run(fleet, replicas, tmp_path):
    router = fleet("consistent_hash")
    victim, survivor = replicas
    before = {"victim": answered(victim), "survivor": answered(survivor)}
    at_kill = {}

    def kill_after_first_commit():
        if not at_kill:
            at_kill.update(victim=answered(victim), survivor=answered(survivor))
            victim.kill()

    stats, rows = run_simulation(router, tmp_path, on_commit=kill_after_first_commit)
    assert at_kill["victim"] > before["victim"], "the killed replica had served nothing: no failover to test"
    assert not victim.alive and answered(survivor) > at_kill["survivor"]
    assert_turns_exact(stats, rows)
    print(f"killed after the first commit, having answered {at_kill['victim'] - before['victim']:.0f} requests; "
          f"{stats.completed} of {stats.contexts} contexts completed, {stats.committed_rows} turn rows, "
          f"{stats.requests} requests, dropped {dict(stats.dropped)}")
