#!/usr/bin/env bash
# Everything this machine's GPUs can run, in one go, with a table of what ran, what was skipped and why.
# Usage: ./scripts/gpu_check.sh [OUTPUT_DIR]    (default runs/gpu-check)
#
# It sets up its own environment first (./scripts/setup.sh installs the CUDA build of torch where
# nvidia-smi lists a GPU; GPU_CHECK_SKIP_SETUP=1 uses .venv as it is), then runs:
#   - tests/gpu: on one GPU the NCCL lane with a group of one rank per process (a collective past its
#     deadline aborted once and the next epoch formed, handles that order a stream and not the host,
#     both reduce-scatters, a training pass without a host synchronisation, the Trainer over NCCL against
#     the plain loop); with 2 GPUs also two ranks over NCCL (the Trainer, a killed peer, ordered against
#     native reduce-scatter). A test skipped for any other reason than "needs 2 GPUs" on a one-GPU
#     machine, or skipped at all with 2 GPUs, fails the check;
#   - a run of 2 simulated hosts x 1 worker on CUDA: one member per host is the flat gRPC path (CUDA
#     units staged through pinned host memory; no local lane), any number of GPUs;
#   - a run of 2 workers on one host on CUDA: NCCL between them (2 GPUs or more);
#   - bench step --memory on CUDA (zerowire, DDP, FSDP2) and bench step on CUDA; with 2 GPUs
#     --colocated --nccl-reduce both (the local lane over NCCL, its ordered and its native reduce-scatter).
# Outputs go to OUTPUT_DIR. The exit code is non-zero when a check failed, or when one that this machine
# could run was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "${GPU_CHECK_SKIP_SETUP:-0}" != 1 ]]; then
    ./scripts/setup.sh >"$out/setup.log" 2>&1 || { echo "setup failed: see $out/setup.log"; exit 1; }
fi
py="${PYTHON:-.venv/bin/python}"
gpus="$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
echo "$("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null) - $gpus GPU(s)"

rows=()
status=0
record() {  # name, outcome (ran|failed|skipped), why
    rows+=("$1|$2|$3")
    [[ "$2" == failed ]] && status=1
}
check() {  # name, needed GPUs, why it needs them, command...
    local name="$1" need="$2" why="$3"
    shift 3
    if ((gpus < need)); then
        record "$name" skipped "needs $need GPU(s) ($why), this machine has $gpus"
        return
    fi
    if "$@" >"$out/$name.log" 2>&1; then record "$name" ran "log: $out/$name.log"; else record "$name" failed "log: $out/$name.log"; fi
}
run_ok() {  # a zerowire run, then its summary must say completed
    local dir="$1"
    shift
    rm -rf "$dir"
    "$py" -m zerowire.cli run --output "$dir" "$@" &&
        "$py" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps({k: s[k] for k in ("completed", "world_size_per_step", "bytes_by_lane", "test_accuracy")})); sys.exit(0 if s["completed"] else 1)' "$dir/summary.json"
}

if ((gpus == 0)); then
    echo "no CUDA device is visible: nothing to check" >&2
    exit 1
fi
check tests-gpu 1 "CUDA" "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu
if [[ -s "$out/tests-gpu.log" ]]; then  # a test skipped that this machine could run is a failure
    skipped="$(grep -c '^SKIPPED' "$out/tests-gpu.log")"
    runnable="$(grep '^SKIPPED' "$out/tests-gpu.log" | grep -vc 'needs 2 GPUs')"
    if ((gpus >= 2 && skipped > 0)) || ((runnable > 0)); then
        record tests-gpu-skips failed "tests/gpu skipped tests this machine ($gpus GPUs) can run: see $out/tests-gpu.log"
    elif ((skipped > 0)); then
        record tests-gpu-skips skipped "$skipped test(s) need 2 GPUs, this machine has $gpus"
    fi
fi
check hierarchical-2x1 1 "CUDA" run_ok "$out/run-hier" --workers 2 --hosts 2 --device cuda --steps 20 --eval-every 0
check colocated-nccl 2 "a GPU per rank for NCCL" run_ok "$out/run-nccl" --workers 2 --hosts 1 --device cuda --steps 20
check bench-memory 1 "CUDA" sh -c "'$py' -m zerowire.cli --log-level WARNING bench step --memory --json --model resnet50 --batch 4 --device cuda >'$out/memory-cuda.json'"
check bench-step 1 "CUDA" sh -c "'$py' -m zerowire.cli --log-level WARNING bench step --json --device cuda --steps 20 --rounds 5 >'$out/step-cuda.json'"
check bench-step-colocated 2 "the local lane over NCCL" sh -c "'$py' -m zerowire.cli --log-level WARNING bench step --json --device cuda --colocated --nccl-reduce both --steps 20 --rounds 5 >'$out/step-colocated-cuda.json'"

printf '\n%-22s %-8s %s\n' CHECK OUTCOME WHY
for row in "${rows[@]}"; do
    IFS='|' read -r name outcome why <<<"$row"
    printf '%-22s %-8s %s\n' "$name" "$outcome" "$why"
done
for f in "$out"/*.json; do
    [[ -s "$f" ]] && "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps({k: d[k] for k in ("peak_bytes_per_rank", "median_step_s", "ratios") if k in d}))' "$f"
done
exit $status
