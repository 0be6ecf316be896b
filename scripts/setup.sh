#!/usr/bin/env bash
# Creates .venv (idempotent) with zerowire and its development tools at the exact versions of
# requirements/dev.lock. torch comes first, as the build that fits the machine (scripts/install_torch.sh):
# the CPU build without an NVIDIA GPU, the CUDA build with one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=requirements/dev.lock
torch_version="$(sed -n "s/^torch==//p" "$lock")"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.zerowire-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -c "$lock" pip
  scripts/install_torch.sh .venv/bin/python "$torch_version" "$lock"
  .venv/bin/python -m pip install -q -c "$lock" -e ".[dev]"
  touch "$stamp"
fi
