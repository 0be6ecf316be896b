#!/usr/bin/env bash
# Generate the Python package protos/ from protos/*.proto (messages, gRPC stubs, type stubs).
#   scripts/gen_protos.sh          regenerate in place
#   scripts/gen_protos.sh --check  regenerate into a temporary folder and fail if the tree differs
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

generate() {
    local out="$1"
    mkdir -p "$out/protos"
    # -I. with protos/ in the file name makes the generated gRPC module import the messages as
    # `from protos import zerowire_pb2`, a package import.
    "$PY" -m grpc_tools.protoc -I. \
        --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
        protos/*.proto
}

if [[ "${1:-}" == "--check" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    generate "$tmp"
    status=0
    for f in "$tmp"/protos/*; do
        name="$(basename "$f")"
        if ! diff -q "$f" "protos/$name" >/dev/null 2>&1; then
            echo "protos/$name is out of date with the .proto files: run scripts/gen_protos.sh" >&2
            status=1
        fi
    done
    exit "$status"
fi
generate .
echo "generated: $(ls protos/*_pb2*.py* | tr '\n' ' ')"
