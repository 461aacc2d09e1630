"""The Dagster code location: assets, checks and resources, built from the settings."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from dagster import AssetKey, AssetsDefinition, Definitions, PipesSubprocessClient, define_asset_job
from dagster_duckdb import DuckDBResource
from dagster_duckdb_polars import DuckDBPolarsIOManager

from music_assets.automation import nightly_refresh_sensor, seed_chain_job, seed_folder_sensor, with_nightly_refresh
from music_assets.evaluation.best_of_n_assets import best_of_n, judge_agreement
from music_assets.curation.assets import deduplicated_pairs, eval_items, training_splits
from music_assets.evaluation.assets import evaluation_report, rm_evaluation
from music_assets.training.assets import reward_model, training_code_version
from music_assets.seeds.assets import seed_ingestion
from music_assets.settings import ENGINE_ROLES, Settings, load_settings
from music_assets.simulation.assets import music_pairs, seed_contexts, simulated_branches
from music_assets.common.tables import SCHEMA
from resources.checkpoints import CheckpointStore
from resources.compute import ComputeResource
from resources.data_config import DataConfig, EvalSetConfig
from resources.evaluation_config import EvaluationConfig
from resources.llm import LLMEngine, OpenAIEngine, VLLMEngine
from resources.seed_catalog import SeedCatalog, SeedSourceConfig, validate_source_name
from resources.simulation_config import SimulationConfig
from resources.training_config import RewardTrainingConfig

# Three stages with different partitions: per seed source, whole data set, per reward-model variant.
SEED_ASSETS = [seed_ingestion, seed_contexts, simulated_branches, music_pairs]
DATA_ASSETS = [eval_items, deduplicated_pairs, training_splits]
TRAINING_ASSETS = [reward_model]
EVALUATION_ASSETS = [rm_evaluation]  # per variant; then, over both variants:
JUDGED_ASSETS = [best_of_n, judge_agreement]  # generation and an LLM judge
REPORT_ASSETS = [evaluation_report]
ASSETS = SEED_ASSETS + DATA_ASSETS + TRAINING_ASSETS + EVALUATION_ASSETS + JUDGED_ASSETS + REPORT_ASSETS
_DECORATED = tuple(ASSETS)  # as the asset modules define them (bare code versions)

ingest_job = define_asset_job("ingest_seeds", selection=["seed_conversations", "seed_quarantine"])


def build_engine(spec: dict, compute: ComputeResource) -> LLMEngine:
    """An engine resource from a config spec: {backend: vllm|openai, model: ..., options...}."""
    spec = dict(spec)
    backend = spec.pop("backend", "vllm")
    if backend == "vllm":
        return VLLMEngine(compute=compute, **spec)
    if backend == "openai":
        return OpenAIEngine(**spec)
    raise ValueError(f"unknown engine backend {backend!r}; expected 'vllm' or 'openai'")


def build_resources(settings: Settings) -> dict:
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    database = str(settings.duckdb_path)
    compute = ComputeResource(**settings.compute)
    return {
        **{role: build_engine(settings.models[role], compute) for role in ENGINE_ROLES},
        "compute": compute,
        "simulation": SimulationConfig(**settings.simulation),
        "data": DataConfig(
            eval_sets={validate_source_name(k): EvalSetConfig(**v) for k, v in settings.eval_sets.items()},
            **settings.data,
        ),
        "training": RewardTrainingConfig(**settings.training),
        "evaluation": EvaluationConfig(**settings.evaluation),
        "checkpoints": CheckpointStore(root=settings.checkpoints),
        "pipes_subprocess_client": PipesSubprocessClient(),
        "io_manager": DuckDBPolarsIOManager(database=database, schema=SCHEMA),
        "duckdb": DuckDBResource(database=database),
        "seed_catalog": SeedCatalog(
            sources={validate_source_name(k): SeedSourceConfig(**v) for k, v in settings.seed_sources.items()},
            seeds_dir=str(settings.seeds_dir),
            **settings.ingest,
        ),
    }


def with_lineage_versions(assets: Sequence[AssetsDefinition],
                          own_versions: Mapping[AssetKey, str] | None = None) -> list[AssetsDefinition]:
    """The assets with lineage code versions: each asset's own code version, then (if it has
    upstream assets) `+up.` and a digest of its upstream assets' lineage versions, recursively.

    Dagster marks an asset unsynced when its own code version changed or an input's data version
    changed since it was materialized; a changed code version does not reach the descendants until
    that asset is re-run. With lineage versions it does, at once: editing a prompt (part of
    `simulated_branches`' version) marks that asset and everything downstream unsynced, per
    materialized partition, and nothing upstream; a new training config (part of `reward_model`'s
    version here) marks the reward models and what follows. `own_versions` overrides the
    decorators' versions by key."""
    own = {spec.key: spec.code_version or "" for a in assets for spec in a.specs}
    own.update(own_versions or {})
    deps = {spec.key: [dep.asset_key for dep in spec.deps] for a in assets for spec in a.specs}
    lineage: dict[AssetKey, str] = {}

    def version(key: AssetKey) -> str:
        if key not in lineage:
            upstream = sorted(f"{dep.to_user_string()}={version(dep) if dep in own else ''}" for dep in deps[key])
            digest = hashlib.sha256("\n".join(upstream).encode()).hexdigest()[:12]
            lineage[key] = f"{own[key]}+up.{digest}" if upstream else own[key]
        return lineage[key]

    return [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version(spec.key))) for a in assets]


def build_assets(settings: Settings, assets: Sequence[AssetsDefinition] | None = None) -> list[AssetsDefinition]:
    """Every asset (or the counterparts of `assets`) with the lineage code versions these settings
    give; `reward_model`'s own version includes a digest of the `training:` options."""
    versioned = with_lineage_versions(_DECORATED, {reward_model.key: training_code_version(settings.training)})
    if assets is None:
        return versioned
    by_keys = {frozenset(a.keys): a for a in versioned}
    return [by_keys[frozenset(a.keys)] for a in assets]


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or load_settings()
    return Definitions(assets=with_nightly_refresh(build_assets(settings)), jobs=[ingest_job, seed_chain_job],
                       sensors=[seed_folder_sensor, nightly_refresh_sensor], resources=build_resources(settings))


_settings = load_settings()
defs = build_definitions(_settings)
# The stage lists (what the demo materializes) carry the same code versions as `defs`, so the UI
# shows the demo's materializations as synced.
SEED_ASSETS, DATA_ASSETS, TRAINING_ASSETS, EVALUATION_ASSETS, JUDGED_ASSETS, REPORT_ASSETS = (
    build_assets(_settings, stage)
    for stage in (SEED_ASSETS, DATA_ASSETS, TRAINING_ASSETS, EVALUATION_ASSETS, JUDGED_ASSETS, REPORT_ASSETS))
ASSETS = SEED_ASSETS + DATA_ASSETS + TRAINING_ASSETS + EVALUATION_ASSETS + JUDGED_ASSETS + REPORT_ASSETS
