"""Session set-up shared by every test module: offline model hubs, one model cache per run, the
real public data in tests/data, and the in-process vLLM engines shut down at the end.

Shared constants and helpers live in tests/helpers.py (test modules import from there, never from
each other)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REAL_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

def pytest_configure(config):
    """One model cache for the whole run: the built models (tiny Llama, SmolLM2 converted from its
    GGUF) are built once, by whichever test needs them first, into a folder that every test and
    every child process (Pipes jobs, `dagster dev`, `vllm serve`, torchrun) reads through
    `MUSIC_MODEL_CACHE`, set here before any of them starts. It is new for each run, so the
    builders themselves are tested on every run; set MUSIC_MODEL_CACHE yourself to reuse built
    models across runs of your own."""
    if "MUSIC_MODEL_CACHE" not in os.environ:
        os.environ["MUSIC_MODEL_CACHE"] = tempfile.mkdtemp(prefix="music-test-models-")
        config._music_model_cache = os.environ["MUSIC_MODEL_CACHE"]


def pytest_unconfigure(config):
    cache = getattr(config, "_music_model_cache", None)  # only the process that made it removes it
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test data missing: {REAL_DATA} (tests/data is part of the project: is the checkout complete?)")
    return REAL_DATA


@pytest.fixture(scope="session", autouse=True)
def _shut_down_engines():
    """In-process vLLM engines are shared across tests; shut them down before pytest exits."""
    yield
    from resources.vllm_engine import release_vllm_engines

    release_vllm_engines()
