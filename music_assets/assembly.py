"""How the code location is assembled from the settings: each stage's assets with their lineage
code versions, the resources the config names, and the groups of assets that run together.

`definitions.py` (what `dagster dev` loads), the CLI's demo, the lineage report and the tests all
build from here, so a config means the same graph and the same code versions everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from dagster import AssetKey, AssetsDefinition, Definitions, PipesSubprocessClient, define_asset_job

from music_assets.automation import nightly_refresh_sensor, seed_chain_job, seed_folder_sensor, with_nightly_refresh
from music_assets.common.config import to_mapping
from music_assets.common.tables import SCHEMA
from music_assets.curation.assets import deduplicated_pairs, eval_items, training_splits
from music_assets.evaluation.assets import evaluation_report, rm_evaluation
from music_assets.evaluation.best_of_n_assets import best_of_n, best_of_n_code_version, judge_agreement
from music_assets.seeds.assets import seed_ingestion
from music_assets.settings import ENGINE_ROLES, Settings
from music_assets.simulation.assets import music_pairs, seed_contexts, simulated_branches, simulation_code_version
from music_assets.training.assets import reward_model, training_code_version
from resources.checkpoints import CheckpointStore
from resources.compute import ComputeResource
from resources.engine_factory import build_engine
from resources.seed_catalog import SeedCatalog, SeedSourceConfig
from resources.warehouse import DuckLake, Warehouse, WarehouseIOManager
from resources.stage_config import CurationResource, EvaluationResource, SimulationResource, TrainingResource

# The stages, as their packages define them.
STAGES: dict[str, list[AssetsDefinition]] = {
    "seeds": [seed_ingestion],
    "simulation": [seed_contexts, simulated_branches, music_pairs],
    "curation": [eval_items, deduplicated_pairs, training_splits],
    "training": [reward_model],
    "evaluation": [rm_evaluation, best_of_n, judge_agreement, evaluation_report],
}
# What runs together (the demo's steps): three partition schemes, per seed source, whole data
# set and per reward-model variant.
SEED_ASSETS = [seed_ingestion, seed_contexts, simulated_branches, music_pairs]
DATA_ASSETS = [eval_items, deduplicated_pairs, training_splits]
TRAINING_ASSETS = [reward_model]
EVALUATION_ASSETS = [rm_evaluation]  # per variant; then, over both variants:
JUDGED_ASSETS = [best_of_n, judge_agreement]  # generation and an LLM judge
REPORT_ASSETS = [evaluation_report]
RUN_GROUPS = (SEED_ASSETS, DATA_ASSETS, TRAINING_ASSETS, EVALUATION_ASSETS, JUDGED_ASSETS, REPORT_ASSETS)
_DECORATED = tuple(a for stage in STAGES.values() for a in stage)  # bare code versions, as decorated

ingest_job = define_asset_job("ingest_seeds", selection=["seed_conversations", "seed_quarantine"])


def build_resources(settings: Settings) -> dict:
    """Every resource the assets use, from the settings: engines per role, compute, the stages'
    configs, storage and the warehouse."""
    settings.home.mkdir(parents=True, exist_ok=True)
    compute = ComputeResource(**settings.compute)
    warehouse = _warehouse(settings)
    return {
        **{role: build_engine(settings.models[role], compute) for role in ENGINE_ROLES},
        "compute": compute,
        "simulation": SimulationResource(**to_mapping(settings.simulation)),
        "data": CurationResource(**to_mapping(settings.data)),
        "training": TrainingResource(**to_mapping(settings.training)),
        "evaluation": EvaluationResource(**to_mapping(settings.evaluation)),
        "checkpoints": CheckpointStore(root=settings.checkpoints, cache_dir=str(settings.home / "checkpoint_cache")),
        "pipes_subprocess_client": PipesSubprocessClient(),
        "io_manager": WarehouseIOManager(**warehouse, schema=SCHEMA),
        "duckdb": Warehouse(**warehouse),
        "seed_catalog": SeedCatalog(
            sources={name: SeedSourceConfig(**spec) for name, spec in settings.seed_sources.items()},
            seeds_dir=str(settings.seeds_dir),
            **settings.ingest,
        ),
    }


def _warehouse(settings: Settings) -> dict:
    """The warehouse resources' fields: the DuckDB file (made ready here), or the lake, whose
    connections are in-memory DuckDBs that attach it."""
    spec = dict(settings.warehouse)
    if spec.pop("backend") == "ducklake":
        return {"database": ":memory:", "ducklake": DuckLake(**spec)}
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    return {"database": str(settings.duckdb_path)}


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


def configured_versions(settings: Settings) -> dict[AssetKey, str]:
    """The own code versions that depend on the settings: the training recipe's digest, and the
    prompt templates' versions (`simulation.prompts_dir`)."""
    prompts = settings.simulation.prompts()
    return {reward_model.key: training_code_version(settings.training.options),
            simulated_branches.key: simulation_code_version(prompts),
            best_of_n.key: best_of_n_code_version(prompts),
            judge_agreement.key: best_of_n_code_version(prompts)}


def build_assets(settings: Settings, assets: Sequence[AssetsDefinition] | None = None) -> list[AssetsDefinition]:
    """Every asset (or the counterparts of `assets`) with the lineage code versions these settings give."""
    versioned = with_lineage_versions(_DECORATED, configured_versions(settings))
    if assets is None:
        return versioned
    by_keys = {frozenset(a.keys): a for a in versioned}
    return [by_keys[frozenset(a.keys)] for a in assets]


def run_groups(settings: Settings) -> tuple[list[AssetsDefinition], ...]:
    """`RUN_GROUPS` with the code versions these settings give (so the UI shows what the demo
    materializes as synced)."""
    return tuple(build_assets(settings, group) for group in RUN_GROUPS)


def build_definitions(settings: Settings) -> Definitions:
    return Definitions(assets=with_nightly_refresh(build_assets(settings)), jobs=[ingest_job, seed_chain_job],
                       sensors=[seed_folder_sensor, nightly_refresh_sensor], resources=build_resources(settings))
