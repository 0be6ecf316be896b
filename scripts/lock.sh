#!/usr/bin/env bash
# Refreshes requirements/dev.lock, the exact versions that ./scripts/setup.sh installs for development and CI:
# a scratch environment gets torch (the version the lock pins, or ZEROWIRE_TORCH_VERSION) and then the newest
# releases of `.[dev]` that pyproject.toml's ranges admit; what it ends up holding is the new lock.
#   ./scripts/lock.sh            refresh the lock
# Review the diff, run ./scripts/test.sh, and commit the lock with the change that needed it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=requirements/dev.lock
torch_version="${ZEROWIRE_TORCH_VERSION:-$(sed -n 's/^torch==//p' "$lock")}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$PY" -m venv "$scratch/venv"
vpy="$scratch/venv/bin/python"
"$vpy" -m pip install -q --upgrade pip
# The lock holds torch's requirements, not its build: setup.sh picks the build that fits each machine.
echo "torch==$torch_version" >"$scratch/torch.txt"
ZEROWIRE_TORCH_VARIANT=cpu scripts/install_torch.sh "$vpy" "$torch_version" "$scratch/torch.txt"
# grpcio-tools at the version that generated protos/, so that the drift check compares them to the letter.
made_by="$(sed -n "s/^GRPC_GENERATED_VERSION = '\(.*\)'$/\1/p" protos/zerowire_pb2_grpc.py)"
"$vpy" -m pip install -q -e ".[dev]" ${made_by:+"grpcio-tools==$made_by"}
"$vpy" -m pip check
{
    echo "# The exact versions of every package that ./scripts/setup.sh installs (development and CI), made by"
    echo "# ./scripts/lock.sh with Python $("$vpy" -c 'import platform; print(platform.python_version())') from pyproject.toml's ranges. torch is pinned by version; setup.sh"
    echo "# installs its CPU or CUDA build, and a CUDA build pins its own NVIDIA packages."
    # The project itself is editable, and a CUDA build's companions (none here: the scratch torch is the CPU
    # build) are torch's to pin.
    "$vpy" -m pip freeze --all --exclude-editable |
        grep -viE '^(nvidia-|triton==|cuda-)' |
        sed -E 's/^torch==([^+]+)\+.*/torch==\1/' |
        LC_ALL=C sort -f
} >"$lock.new"
mv "$lock.new" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
