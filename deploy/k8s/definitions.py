"""The code location on Kubernetes: the Definitions of `music_assets.definitions` (from the config
in MUSIC_CONFIG, e.g. configs/scale.yaml), with every step run as its own Kubernetes Job by
dagster-k8s' `k8s_job_executor`, configured by executor.yaml beside this file (the reward-model
training step on a GPU node). The user-code image serves it with

    dagster api grpc --python-file deploy/k8s/definitions.py --host 0.0.0.0 --port 3030

Kept out of the package: only a Kubernetes deployment needs dagster-k8s (`pip install .[k8s]`).
"""

from pathlib import Path

import yaml
from dagster import Definitions
from dagster_k8s import k8s_job_executor

from music_assets.assembly import build_definitions
from music_assets.settings import load_settings

EXECUTOR_CONFIG = yaml.safe_load(Path(__file__).with_name("executor.yaml").read_text())

defs = Definitions.merge(build_definitions(load_settings()),
                         Definitions(executor=k8s_job_executor.configured(EXECUTOR_CONFIG, name="k8s_steps")))
