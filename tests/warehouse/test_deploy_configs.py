"""The scale-out configs as far as they can be checked without their servers: configs/scale.yaml
and the `warehouse` section of any config, the Dagster instance files in deploy/ against the
schemas of the classes they name, and the Kubernetes code location (deploy/k8s/definitions.py)
loading with its executor config. Nothing here connects to Postgres or a cluster."""

from __future__ import annotations

import runpy

import pytest
import yaml
from dagster import validate_run_config
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import UserDefinedDagsterK8sConfig

from music_assets.assembly import build_definitions, build_resources
from music_assets.common.config import ConfigError
from music_assets.settings import load_settings
from tests.helpers import REPO, load_settings_in

SCALE = REPO / "configs" / "scale.yaml"
PG_ENV = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "u", "DAGSTER_PG_PASSWORD": "p",
          "DAGSTER_PG_DB": "dagster"}


def test_the_scale_config_chooses_ducklake_and_the_default_stays_one_file(tmp_path):
    settings = load_settings(SCALE, environ={"MUSIC_HOME": str(tmp_path / "home")})
    assert settings.warehouse["backend"] == "ducklake" and settings.warehouse["catalog"].startswith("postgres:")
    lake = build_resources(settings)["duckdb"]
    assert lake.ducklake.data_path == settings.warehouse["data_path"] and lake.database == ":memory:"
    default = build_resources(load_settings_in(tmp_path / "default"))
    assert default["duckdb"].ducklake is None and default["io_manager"].ducklake is None
    assert default["duckdb"].database == str(tmp_path / "default" / "home" / "warehouse.duckdb")


@pytest.mark.parametrize("warehouse, error", [
    ({"backend": "duckdbb"}, "warehouse.backend: unknown backend 'duckdbb'; did you mean 'duckdb'?"),
    ({"backend": "ducklake", "catalog": "postgres:dbname=m"},
     "warehouse.data_path: required with `backend: ducklake`"),
    ({"catalog": "postgres:dbname=m"}, "warehouse.catalog: only read with `backend: ducklake`"),
    ({"backend": "ducklake", "catalog": "x", "data_path": "/d", "data_pth": 1}, "warehouse.data_pth: unknown key; did you mean 'data_path'?"),
])
def test_a_bad_warehouse_section_is_refused_with_its_path(tmp_path, warehouse, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace("?", r"\?")):
        load_settings_in(tmp_path, warehouse=warehouse)


def test_the_environment_replaces_the_warehouse_whole(tmp_path):
    """A catalog from the file and a backend from the environment would be no lake."""
    settings = load_settings(SCALE, environ={"MUSIC_HOME": str(tmp_path), "MUSIC__WAREHOUSE": "{backend: duckdb}"})
    assert settings.warehouse == {"backend": "duckdb"}


@pytest.mark.parametrize("instance_file", ["dagster.yaml", "k8s/dagster.yaml"])
def test_the_instance_files_store_everything_in_postgres(instance_file, tmp_path, monkeypatch):
    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "dagster.yaml").write_text((REPO / "deploy" / instance_file).read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # validated against Dagster's instance schema
    assert set(config["storage"]) == {"postgres"}  # runs, event logs and schedules alike
    assert "concurrency" not in config  # DuckLake's writers need no pool limit
    launcher = config.get("run_launcher")
    if launcher:  # the Kubernetes run launcher's own schema (instantiating it needs a cluster)
        assert launcher["class"] == "K8sRunLauncher"
        checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
        assert checked.success, checked.errors


def test_the_kubernetes_code_location_loads_with_a_gpu_training_pod(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSIC_CONFIG", str(SCALE))
    monkeypatch.setenv("MUSIC_HOME", str(tmp_path / "home"))
    defs = runpy.run_path(str(REPO / "deploy" / "k8s" / "definitions.py"))["defs"]
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s_steps"
    assert validate_run_config(job, {})  # the executor's config (executor.yaml) against dagster-k8s' schema
    per_step = yaml.safe_load((REPO / "deploy" / "k8s" / "executor.yaml").read_text())["per_step_k8s_config"]
    training = UserDefinedDagsterK8sConfig.from_dict(per_step["reward_model"])
    assert training.container_config["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert set(per_step) <= {a.op.name for a in defs.assets}  # keyed by steps that exist
    assert build_definitions(load_settings(SCALE, environ={"MUSIC_HOME": str(tmp_path / "home")})).resources
