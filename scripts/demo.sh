#!/usr/bin/env bash
# The main job: set up the environment and train on a local cluster with the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/zerowire run --workers 2 --output runs/demo "$@"
