"""The training stage's settings (YAML section `training:`): the reward-model recipe (`options`,
one `TrainConfig`, like TRL's `RewardConfig`) and how the job is launched (processes, threads).

`TrainConfig` travels to the training job as JSON and is rebuilt there with `TrainConfig(**...)`;
its `fingerprint()` (a hash of every option, defaults included) is part of `reward_model`'s code
version and of each checkpoint's metadata, so a changed option marks the models unsynced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from music_assets.common.config import setting


PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure")
STRATEGIES = ("ddp", "fsdp")
PREFIX_SHARING = ("auto", "on", "off")


@dataclass
class TrainConfig:
    backbone: str = setting("builtin:smollm2", help="a local HF folder, a hub id, or builtin:minilm / builtin:smollm2")
    chat_template: str | None = setting(
        None, help="None: the tokenizer's own chat template; 'plain' (User:/Assistant:) for encoders without one")
    max_length: int = setting(512, help="tokens per conversation; longer ones are truncated from the left")
    batch_size: int = setting(16, help="pairs per optimizer step, across all processes (paper: 64)")
    micro_batch_size: int = setting(8, help="pairs per forward pass per process (gradient accumulation fills the rest)")
    learning_rate: float = setting(2e-5, help="peak learning rate (paper: 2e-6 for Gemma-2-9B-it)")
    weight_decay: float = setting(0.0, help="AdamW weight decay")
    warmup_ratio: float = setting(0.05, help="share of the steps with a linear warm-up")
    lr_scheduler: str = setting("linear", help="linear | cosine | constant (after warm-up)")
    max_steps: int | None = setting(None, help="optimizer steps (paper: 2500); None: `epochs` over the data")
    epochs: float = setting(1.0, help="passes over the training pairs when max_steps is None")
    max_grad_norm: float = setting(1.0, help="gradient clipping by global norm")
    margin: float = setting(0.0, help="BT margin: loss = -log sigmoid(r_chosen - r_rejected - margin)")
    center_rewards_coefficient: float = setting(
        0.0, help="weight of mean((r_chosen + r_rejected)^2), TRL's reward-centering term")
    precision: str = setting(
        "auto", help="fp32 | bf16 (mixed: fp32 weights and optimizer state, bf16 compute) | bf16-pure (bf16 weights, "
                     "gradients and optimizer state: half the memory) | auto (bf16 where the hardware has it natively)")
    group_by_length: bool = setting(True, help="batches of similar length: less padding")
    group_by_conversation: bool = setting(
        False, help="a seed conversation's pairs (its seed pair and the MUSIC pairs simulated from it) share a "
                    "micro-batch where they fit, so packed training reads their common opening once; batches "
                    "then hold fewer, related conversations (InstructGPT batches one prompt's comparisons alike); "
                    "pays only with prefix_sharing: unpacked, mixed lengths cost padding")
    gradient_checkpointing: bool = setting(
        False, help="recompute activations in backward: less memory, ~30% slower")
    prefix_sharing: str = setting(
        "auto", help="on: a pair is one packed row [shared prefix | chosen | rejected] (the prefix's forward and "
                     "backward run once; decoders of the Llama family with sdpa, eager or flex attention) | off: each side in "
                     "full | auto: on where the model allows it and the pairs share enough of their tokens")
    eval_every: int = setting(50, help="steps between validation passes (0: only at the end)")
    select: str = setting(
        "last", help="which weights the checkpoint holds: last (the final step's, as a fixed-step recipe means) | "
                     "best (the best validation pass's; kept on disk while training)")
    early_stopping_patience: int | None = setting(
        None, help="validation passes without improvement before stopping; None: never stop early")
    checkpoint_every: int = setting(0, help="steps between resumable training-state saves (0: never)")
    log_every: int = setting(10, help="steps between logged loss/accuracy lines")
    seed: int = setting(0, help="seeds initialization of the head, batch order and dropout")

    def __post_init__(self):
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_scheduler must be linear, cosine or constant, got {self.lr_scheduler!r}")
        if self.select not in ("last", "best"):
            raise ValueError(f"select must be last or best, got {self.select!r}")
        if self.prefix_sharing not in PREFIX_SHARING:
            raise ValueError(f"prefix_sharing must be one of {', '.join(PREFIX_SHARING)}, got {self.prefix_sharing!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingConfig:
    options: TrainConfig = setting(factory=TrainConfig, help="the reward-model recipe")
    processes: int = setting(1, help="training processes (torchrun --nproc_per_node): gloo on CPU, NCCL on GPU")
    strategy: str = setting(
        "ddp", help="ddp (a full replica per process) | fsdp (FSDP2: parameters, gradients and optimizer state "
                    "sharded over the processes, per decoder layer)")
    threads_per_process: int | None = setting(None, help="torch CPU threads per process; None: torch's default")

    def __post_init__(self):
        if self.processes < 1:
            raise ValueError(f"training.processes must be >= 1, got {self.processes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"training.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
