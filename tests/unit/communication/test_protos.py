"""The generated protobuf package is importable as a package and the drift check works both ways."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "scripts" / "gen_protos.sh"), "--check"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_generated_code_is_a_package_and_matches_the_proto() -> None:
    from protos import zerowire_pb2, zerowire_pb2_grpc

    assert zerowire_pb2_grpc.protos_dot_zerowire__pb2 is zerowire_pb2
    assert "from protos import zerowire_pb2" in (REPO / "protos" / "zerowire_pb2_grpc.py").read_text()
    result = _check(REPO)
    assert result.returncode == 0, result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen_protos.sh", tmp_path / "scripts")
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    assert _check(tmp_path).returncode == 0
    proto = tmp_path / "protos" / "zerowire.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra { uint32 x = 1; }\n")
    result = _check(tmp_path)
    assert result.returncode != 0
    assert "out of date" in result.stderr
