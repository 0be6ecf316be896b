#!/usr/bin/env bash
# Generate the Python package protos/ from protos/*.proto (messages, gRPC stubs, type stubs).
#   scripts/gen_protos.sh          regenerate in place
#   scripts/gen_protos.sh --check  fail if protos/ no longer says what the .proto files say
# Both run grpc_tools.protoc the one way scripts/proto_drift.py does: -I. with protos/ in the file name,
# so the generated gRPC module imports the messages as `from protos import zerowire_pb2` (a package import).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [[ "${1:-}" == "--check" ]]; then
    # Any change to a message or a service fails; another grpcio-tools version alone does not.
    exec "$PY" scripts/proto_drift.py .
fi
exec "$PY" scripts/proto_drift.py --write .
