"""`music-assets check-config F`: checks a config and prints its run's plan without running
anything (issue: the paper's run from one config)."""

import subprocess
import sys
from pathlib import Path

import yaml

from music_assets.check_config import check, render, simulation_requests, source_rows
from music_assets.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "music_assets.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_the_papers_config_checks_and_its_plan_fits():
    done = _cli("check-config", "configs/paper.yaml")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "skywork: 77,016 pairs (dataset card); 16 partition(s)" in out and "31,000 contexts simulated" in out
    assert "T = 5, c in [1, 4]" in out
    assert "28.11 GiB per rank" in out and ": fits" in out  # Gemma-2-9B-it, FSDP over 8, bf16, checkpointing
    assert "1,000 prompts x N in [2, 4, 8] x 3 turns" in out
    # what the user must still provide: keys by variable name, endpoints' context, storage placeholders
    assert "$OPENAI_API_KEY (not set here)" in out and "$MUSIC_FLEET_API_KEY" in out
    assert "--max-model-len >= 7,680" in out
    assert "checkpoints: s3://my-bucket/music-rm looks like a placeholder" in out
    assert "warehouse: the Postgres password" in out
    assert out.rstrip().endswith("## Verdict: the plan fits")


def test_a_plan_that_cannot_run_says_why_and_exits_1(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path / "home"),
        "simulation": {"turns": 5, "assistant_sampling": {"max_tokens": 1024}},
        "training": {"processes": 1, "options": {"backbone": "google/gemma-2-9b-it", "max_length": 2048,
                                                  "precision": "fp32", "max_steps": 10}},
    }))
    done = _cli("check-config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "does NOT fit" in done.stdout
    assert "compute.max_model_len 2048 < the ~" in done.stdout  # in-process engines: a context too small


def test_an_invalid_config_is_refused_with_its_path(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("simulation: {turnz: 5}\n")
    done = _cli("check-config", str(config))
    assert done.returncode == 2 and "simulation.turnz: unknown key; did you mean 'turns'?" in done.stderr


def test_requests_per_context_follow_the_contrast_turn():
    # T = 2, c = 1: a shared user message, the rewrite, two answers; then two users, two answers
    assert simulation_requests(2, 2, None) == {"user": 3, "rewrite": 1, "assistant": 4}
    # fixed c = T: T - 1 shared turns (2 each), then user + rewrite + 2 answers
    assert simulation_requests(3, 1, 3) == {"user": 3, "rewrite": 1, "assistant": 4}
    # drawn c: the mean over [1, T - m + 1]
    assert simulation_requests(3, 2, None) == {"user": (5 + 4) / 2, "rewrite": 1, "assistant": (6 + 5) / 2}


def test_local_sources_are_counted_from_their_files(tmp_path):
    data = tmp_path / "seeds.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}\n')
    assert source_rows({"path": str(data)}) == (3, "file (lines)")
    assert source_rows({"hf_dataset": "someone/unknown"})[0] is None
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "h"), "seed_sources": {"mine": {"path": str(data)}},
                                      "simulation": {"turns": 2}}))
    plan = check(load_settings(str(config)))
    assert "- mine: 3 pairs (file (lines)); 1 partition(s); 3 contexts simulated" in render(plan, str(config))
    assert plan.totals["music_pairs"] == 3
