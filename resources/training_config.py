"""Reward-model training settings (YAML section `training:`), as a resource.

`options` are the fields of `music_assets.trainer.TrainConfig` (validated there, so a typo is an
error naming the field); `processes` > 1 launches DDP through torchrun (gloo on CPU, NCCL on GPU).
The paper's recipe is `configs/paper-gemma2-9b.yaml`.
"""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource

from music_assets.training.trainer import TrainConfig


class RewardTrainingConfig(ConfigurableResource):
    options: dict[str, Any] = {}
    processes: int = 1  # DDP processes (torchrun --nproc_per_node)
    threads_per_process: int | None = None  # torch CPU threads per process; None: torch's default

    def train_config(self) -> TrainConfig:
        try:
            return TrainConfig(**self.options)
        except TypeError as exc:
            known = sorted(TrainConfig.__dataclass_fields__)
            raise ValueError(f"training options: {exc}; known options: {', '.join(known)}") from None
