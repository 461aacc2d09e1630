"""Shared fixtures: paths to the real public data in tests/data and a scratch Settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO / "tests" / "data"  # slices of public datasets; tests/data/README.md


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test data missing: {REAL_DATA} (tests/data is part of the project: is the checkout complete?)")
    return REAL_DATA


def load_settings_in(tmp_path: Path, **config):
    """Settings whose home (DuckDB file, seeds dir) is a temp directory."""
    import yaml

    from music_assets.settings import load_settings

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "music.yaml"
    cfg.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), **config}))
    return load_settings(cfg)


@pytest.fixture(scope="session", autouse=True)
def _shut_down_engines():
    """In-process vLLM engines are shared across tests; shut them down before pytest exits."""
    yield
    from resources.llm import release_vllm_engines

    release_vllm_engines()
