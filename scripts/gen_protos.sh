#!/usr/bin/env bash
# Generate the Python package protos/ from protos/*.proto (messages, gRPC stubs, type stubs).
#   scripts/gen_protos.sh          regenerate in place
#   scripts/gen_protos.sh --check  fail if protos/ no longer says what the .proto files say
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
    # Regenerates into a scratch folder and compares what matters: any change to a message or a service
    # fails, another grpcio-tools version alone does not (scripts/proto_drift.py says how).
    exec "$PY" scripts/proto_drift.py .
fi
generate .
echo "generated: $(ls protos/*_pb2*.py* | tr '\n' ' ')"
