#!/usr/bin/env bash
# The test command: set up the environment (and, as root, the system packages some tests need), check
# lint/types/proto drift, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/system_packages.sh
./scripts/lint.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
