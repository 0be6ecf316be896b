"""Helpers to run a real `zerowire coordinator` process in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def coordinator_cmd(port: int, db: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "zerowire.cli", "--log-level", "INFO", "coordinator",
        "--host", "127.0.0.1", "--port", str(port), "--db", str(db), *extra,
    ]  # fmt: skip


def coordinator_env(token: str | None, read_token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROWIRE_")}
    if token is not None:
        env["ZEROWIRE_TOKEN"] = token
    if read_token is not None:
        env["ZEROWIRE_READ_TOKEN"] = read_token
    return env


def spawn(
    reaper: Any, port: int, db: Path, token: str | None, *extra: str, read_token: str | None = None
) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = reaper.spawn(
        coordinator_cmd(port, db, *extra),
        env=coordinator_env(token, read_token),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc


def wait_healthy(proc: subprocess.Popen[bytes], base: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"coordinator exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"coordinator at {base} not healthy within {timeout} s")
