"""`zerowire coordinator` start-up checks, as a real process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProcessReaper, free_port
from tests.integration.coordinator_proc import REPO, coordinator_cmd, coordinator_env, spawn, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def run_briefly(args: list[str], token: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=coordinator_env(token), cwd=str(REPO), capture_output=True, text=True, timeout=30
    )


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    out = run_briefly(coordinator_cmd(free_port(), tmp_path / "c.db"), token=None)
    assert out.returncode == 2
    assert "token is required" in out.stderr and "--insecure-no-auth" in out.stderr
    assert not (tmp_path / "c.db").exists()


def test_timeout_ordering_is_validated_at_start(tmp_path: Path) -> None:
    args = coordinator_cmd(free_port(), tmp_path / "c.db", "--heartbeat-interval", "3")
    out = run_briefly(args, token="t")
    assert out.returncode == 2
    assert "heartbeat interval (3 s) must be shorter than heartbeat timeout (2 s)" in out.stderr


def test_insecure_no_auth_warns_loudly_and_serves(reaper: ProcessReaper, tmp_path: Path) -> None:
    port = free_port()
    proc = spawn(reaper, port, tmp_path / "c.db", None, "--insecure-no-auth")
    wait_healthy(proc, f"http://127.0.0.1:{port}")
    assert httpx.get(f"http://127.0.0.1:{port}/workers", timeout=5).status_code == 200
    proc.kill()
    proc.wait(timeout=10)
    assert proc.stdout is not None
    log = proc.stdout.read().decode()
    assert "WARNING: --insecure-no-auth" in log and "AUTHENTICATION DISABLED" in log
