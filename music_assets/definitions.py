"""The Dagster code location: assets, checks and resources, built from the settings."""

from __future__ import annotations

from dagster import Definitions, define_asset_job
from dagster_duckdb import DuckDBResource
from dagster_duckdb_polars import DuckDBPolarsIOManager

from music_assets.seeds import seed_ingestion
from music_assets.settings import Settings, load_settings
from music_assets.tables import SCHEMA
from resources.seed_catalog import SeedCatalog, SeedSourceConfig, validate_source_name

ASSETS = [seed_ingestion]

ingest_job = define_asset_job("ingest_seeds", selection=["seed_conversations", "seed_quarantine"])


def build_resources(settings: Settings) -> dict:
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    database = str(settings.duckdb_path)
    return {
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
