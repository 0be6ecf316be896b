#!/usr/bin/env bash
# Installs the torch build that fits this machine into an environment:
#   scripts/install_torch.sh PYTHON VERSION CONSTRAINTS
# - an NVIDIA GPU (`nvidia-smi -L` lists one): the registry's build of torch==VERSION, which bundles CUDA
#   (several GB with its NVIDIA libraries);
# - otherwise the CPU build (about 0.75 GB): from PyTorch's CPU index when it answers, else the registry's
#   torch==VERSION (on x86_64 Linux that is a CUDA build unless pip finds a CPU wheel first, and it says so).
# ZEROWIRE_TORCH_VARIANT=cpu|cuda overrides the detection; ZEROWIRE_TORCH_CPU_INDEX the CPU index.
# torch's own requirements are pinned by CONSTRAINTS (the lock); a CUDA build pins its NVIDIA packages itself.
set -euo pipefail
py="$1" version="$2" constraints="$3"
cpu_index="${ZEROWIRE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

variant="${ZEROWIRE_TORCH_VARIANT:-}"
if [[ -z "$variant" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        variant=cuda
    else
        variant=cpu
    fi
fi
case "$variant" in cpu | cuda) ;; *) echo "ZEROWIRE_TORCH_VARIANT must be cpu or cuda, not '$variant'" >&2; exit 2 ;; esac

# The installed torch, as "VERSION cpu|cuda", or nothing.
installed="$("$py" - <<'PY' 2>/dev/null || true
import importlib.metadata as md
try:
    version = md.version("torch").split("+")[0]
except md.PackageNotFoundError:
    raise SystemExit(0)
# The variant from the files alone (importing torch takes seconds): CUDA builds ship libtorch_cuda.
files = md.distribution("torch").files or []
cuda = any("libtorch_cuda" in str(f) for f in files)
print(version, "cuda" if cuda else "cpu")
PY
)"
if [[ "$installed" == "$version $variant" ]]; then
    exit 0
fi

pip=("$py" -m pip install -q)
if [[ "$variant" == cuda ]]; then
    echo "installing torch==$version, CUDA build (an NVIDIA GPU is present; several GB)" >&2
    "${pip[@]}" -c "$constraints" "torch==$version"
elif "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)' \
    "$cpu_index" >/dev/null 2>&1; then
    echo "installing torch==$version, CPU build, from PyTorch's CPU index (about 0.75 GB)" >&2
    # Only torch from that index; its requirements come from the registry, pinned by the lock.
    "${pip[@]}" --no-deps --index-url "$cpu_index" "torch==$version"
else
    echo "PyTorch's CPU index ($cpu_index) does not answer: installing the registry's torch==$version" >&2
    "${pip[@]}" -c "$constraints" "torch==$version"
fi
got="$("$py" -c 'import importlib.metadata as md; fs = md.distribution("torch").files or []; print("cuda" if any("libtorch_cuda" in str(f) for f in fs) else "cpu")')"
if [[ "$got" != "$variant" ]]; then
    echo "note: wanted the $variant build of torch, pip installed a $got build" >&2
fi
