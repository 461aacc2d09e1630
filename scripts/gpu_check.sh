#!/usr/bin/env bash
# The GPU device check (scripts/gpu_check.py): DDP then FSDP, bf16, a ~0.8B random Llama reward model,
# 100 steps each on cuda:0, with the memory plan next to the measured peak, then prefix sharing (packed pairs
# through FlexAttention against unpacked ones: loss, gradients, rewards, and timings). About 3-5 minutes on
# an H200 (estimated: FlexAttention compiles once per process; `--no-prefix` skips the last part); the
# timeout stops it well inside 8. Uses the machine's python3 as it is (torch, transformers, tokenizers):
# installs nothing, creates no venv, reaches no network. Extra arguments go to gpu_check.py, e.g.
# `bash scripts/gpu_check.sh --steps 200 --size large` or `--strategies fsdp`. Exit status: 0 every check
# passed, 124 timed out, anything else a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
fi
exec timeout --kill-after=15 450 python3 scripts/gpu_check.py --forbid-imports dagster,duckdb,polars,vllm,pydantic "$@"
