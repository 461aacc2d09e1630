"""The one place where a run's environment is chosen: paths, seed sources, models, compute.

Everything comes from a YAML file named by `MUSIC_CONFIG` (see `configs/`), with defaults that run
the embedded demo on a laptop CPU. Dagster cannot swap resources on a loaded `Definitions`, so CPU
vs GPU, tiny vs real model and local vs remote storage are all decided here, before it is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Settings:
    home: Path  # where the DuckDB file, checkpoints and reports go
    duckdb_path: Path
    seeds_dir: Path
    seed_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    config_path: Path | None = None


def load_settings(config_path: str | os.PathLike | None = None) -> Settings:
    """Reads the YAML config (argument, else $MUSIC_CONFIG, else none) over the defaults.

    Relative paths inside the file are relative to the file, so a config can travel with its data.
    """
    config_path = config_path or os.environ.get("MUSIC_CONFIG") or None
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if config_path:
        path = Path(config_path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"MUSIC_CONFIG points to {path}, which does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
        base = path.parent
    unknown = set(raw) - {"home", "duckdb_path", "seeds_dir", "seed_sources", "ingest"}
    if unknown:
        raise ValueError(f"{config_path}: unknown config keys {sorted(unknown)}")

    home = _path(raw.get("home") or os.environ.get("MUSIC_HOME") or ".music", base)
    sources = {}
    for name, spec in (raw.get("seed_sources") or {}).items():
        spec = dict(spec)
        if spec.get("path"):
            spec["path"] = str(_path(spec["path"], base))
        sources[name] = spec
    return Settings(
        home=home,
        duckdb_path=_path(raw["duckdb_path"], base) if raw.get("duckdb_path") else home / "warehouse.duckdb",
        seeds_dir=_path(raw["seeds_dir"], base) if raw.get("seeds_dir") else home / "seeds",
        seed_sources=sources,
        ingest=dict(raw.get("ingest") or {}),
        config_path=Path(config_path).resolve() if config_path else None,
    )


def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
