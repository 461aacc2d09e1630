#!/usr/bin/env bash
# The demo command from README.md: installs what is missing, then materializes the asset graph on
# the embedded seed set with the default (CPU) models. Results land in .music/ (MUSIC_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec .venv/bin/music-assets demo "$@"
