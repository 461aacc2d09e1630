#!/usr/bin/env bash
# The test command from README.md: installs what is missing (scripts/setup.sh), lints with ruff
# and sqlfluff (both configured in pyproject.toml), then runs pytest. Extra arguments go to pytest, e.g.
# `./scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
.venv/bin/ruff check .
.venv/bin/sqlfluff lint sql/
exec .venv/bin/python -m pytest "$@"
