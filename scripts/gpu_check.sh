#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the GPU tests (tests/gpu) and the GPU figures (peak memory
# per rank of zerowire, DDP and FSDP2; step time of zerowire, FSDP2 and DDP), each written to OUTPUT_DIR.
# Usage: ./scripts/gpu_check.sh [OUTPUT_DIR]    (default runs/gpu-check)
# PYTHON names the interpreter of an environment with a CUDA build of torch and the project's
# requirements (default .venv/bin/python, as ./scripts/setup.sh makes it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), "GPU(s)")' || exit 1
status=0
"$py" -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$out/tests-gpu.txt" || status=1
"$py" -m zerowire.cli --log-level WARNING bench step --memory --json --model resnet50 --batch 4 --device cuda \
    >"$out/memory-cuda.json" 2>"$out/memory-cuda.log" || status=1
"$py" -m zerowire.cli --log-level WARNING bench step --json --device cuda --steps 20 --rounds 5 \
    >"$out/step-cuda.json" 2>"$out/step-cuda.log" || status=1
for f in "$out"/*.json; do
    "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps({k: d[k] for k in ("peak_bytes_per_rank", "median_step_s", "ratios") if k in d}))' "$f" || status=1
done
exit $status
