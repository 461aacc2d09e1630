"""The Dagster code location: assets, checks and resources, built from the settings."""

from __future__ import annotations

from dagster import Definitions, PipesSubprocessClient, define_asset_job
from dagster_duckdb import DuckDBResource
from dagster_duckdb_polars import DuckDBPolarsIOManager

from music_assets.best_of_n_assets import best_of_n, judge_agreement
from music_assets.data_assets import deduplicated_pairs, eval_items, training_splits
from music_assets.evaluation_assets import evaluation_report, rm_evaluation
from music_assets.reward_assets import reward_model
from music_assets.seeds import seed_ingestion
from music_assets.settings import ENGINE_ROLES, Settings, load_settings
from music_assets.simulation_assets import music_pairs, seed_contexts, simulated_branches
from music_assets.tables import SCHEMA
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


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or load_settings()
    return Definitions(assets=ASSETS, jobs=[ingest_job], resources=build_resources(settings))


defs = build_definitions()
