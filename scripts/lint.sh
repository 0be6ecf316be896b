#!/usr/bin/env bash
# ruff (lint + format check), mypy, and a drift check of the generated protobuf code.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
./scripts/gen_protos.sh --check
