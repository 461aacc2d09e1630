"""What several test modules share: paths, scratch settings, small configs, and read-only DuckDB
queries. Test modules import from here, never from each other (a test module imported by another
would also have its tests collected twice under some selections, and its fixtures re-bound)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO / "tests" / "data"  # slices of public datasets; tests/data/README.md
UF = REAL_DATA / "ultrafeedback" / "eval_clean.jsonl"
MT_BENCH = REAL_DATA / "mt-bench" / "question.jsonl"

# Short UltraFeedback rows (0-based line numbers; line 43 has identical sides and is avoided), so
# the tiny model's context holds them.
SLICES = {"a": [122, 152, 97, 49, 57], "b": [111, 189, 147, 3, 187], "c": [22, 80, 18, 180, 58]}

# Every in-process vLLM engine of the suite is built from this compute config, so that the tests
# that load the tiny Llama share one engine per process (resources/vllm_engine.py caches engines by model
# and engine arguments): loading one costs far more than any test that uses it.
# MUSIC_TEST_VLLM_DTYPE (float32 | bfloat16) overrides `dtype: auto`, to see in one run what the
# other kind of CPU would generate (vLLM picks bf16 where the CPU has AVX512-BF16, else fp32).
ENGINE_COMPUTE = {"max_model_len": 2048,
                  **({"dtype": os.environ["MUSIC_TEST_VLLM_DTYPE"]} if os.environ.get("MUSIC_TEST_VLLM_DTYPE") else {})}
TINY_LLAMA = {"models": {"default": {"backend": "vllm", "model": "builtin:tiny-llama"}}, "compute": ENGINE_COMPUTE}

# The tiny Llama simulating 8 contexts over 3 turns: every MUSIC mechanism, in seconds.
TINY_SIM = {
    "max_contexts": 8,
    "turns": 3,
    "user_sampling": {"max_tokens": 48, "temperature": 0.8},
    "assistant_sampling": {"max_tokens": 64, "temperature": 0.8},
    "rewrite_sampling": {"max_tokens": 48, "temperature": 0.8},
}



def short_tiny_simulation(max_contexts: int) -> dict:
    """Config for the tiny Llama simulating `max_contexts` contexts for 2 turns of at most 32 tokens
    per message: the cheapest run that still exercises every stage of a partition's chain."""
    short = {f"{role}_sampling": {"max_tokens": 32, "temperature": 0.7} for role in ("user", "assistant", "rewrite")}
    return {**TINY_LLAMA, "simulation": {"max_contexts": max_contexts, "turns": 2, **short}}


# A MiniLM reward model in 3 steps: enough to exercise training, checkpoints and evaluation.
MINILM_TRAINING = {"options": {"backbone": "builtin:minilm", "chat_template": "plain", "max_length": 48,
                               "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-4, "max_steps": 3,
                               "eval_every": 0, "log_every": 1}}


def sensor_tick(defs, instance, cursor):
    """One evaluation of the seed-folder sensor as the daemon does it, its partition additions applied to
    the instance (the daemon applies them before launching the runs)."""
    from dagster import build_sensor_context

    with build_sensor_context(instance=instance, instance_ref=instance.get_ref(), cursor=cursor, definitions=defs,
                              resources={"seed_catalog": defs.resources["seed_catalog"]}) as context:
        result = defs.resolve_sensor_def("seed_folder_sensor").evaluate_tick(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def load_settings_in(tmp_path: Path, **config):
    """Settings whose home (DuckDB file, seeds dir) is a temp directory."""
    import yaml

    from music_assets.settings import load_settings

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "music.yaml"
    cfg.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), **config}))
    return load_settings(cfg)


def write_seed(path: Path, lines: list[int]) -> str:
    """A seed file of the given UltraFeedback rows; returns its sha256."""
    rows = UF.read_text().splitlines()
    path.write_text("".join(rows[i] + "\n" for i in lines))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query(settings, sql: str, params=None) -> list[tuple]:
    """Rows of `sql` on the settings' DuckDB file, opened read-only and closed again."""
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    try:
        return con.execute(sql, params or {}).fetchall()
    finally:
        con.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side_by_side(jobs: dict[str, tuple[dict, int]], tmp_path: Path) -> None:
    """Runs training jobs at the same time, each under torchrun with `nproc` processes of one
    thread (so their results do not depend on what else runs): the processes' start-up (imports,
    model load) overlaps instead of adding up. Measured on 2 cores: the DDP test's two jobs in
    34 s side by side, 45 s one after the other. (Two 2-thread trainings gain nothing this way.)"""
    procs = {}
    for name, (job, nproc) in jobs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**job, "threads_per_process": 1}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "music_assets.training.train_rm", str(tmp_path / f"{name}.json")]
        with open(tmp_path / f"{name}.log", "w") as log:  # a file, not a pipe: no job can block on it
            procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                                           start_new_session=True)  # its own group: torchrun and its ranks
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=600) == 0, f"{name}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
    finally:  # one failed or timed out: the others (launcher and ranks) must not outlive the test
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
