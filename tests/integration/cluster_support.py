"""Helpers of the cluster integration tests: real `zerowire` processes, REST polling, leftover checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.conftest import ProcessReaper, free_port

T = TypeVar("T")
TOKEN = "cluster-test-token-0123456789"  # the cluster token: admits workers
READ_TOKEN = "read-test-token-0123456789"  # the read-only token the tests watch the cluster with


def zw(*args: str) -> list[str]:
    return [sys.executable, "-m", "zerowire.cli", *args]


def env(token: str = TOKEN, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("ZEROWIRE_")}
    out.update({"ZEROWIRE_TOKEN": token, "ZEROWIRE_READ_TOKEN": READ_TOKEN, "PYTHONUNBUFFERED": "1", **extra})
    return out


def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def get(url: str, path: str, token: str = READ_TOKEN, **params: Any) -> Any:
    response = httpx.get(
        f"{url}{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    response.raise_for_status()
    return response.json()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_coordinator(
    reaper: ProcessReaper, tmp: Path, *job_args: str, heartbeat_timeout: str = "2", port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    log = open(tmp / "coordinator.log", "ab")
    proc = reaper.spawn(
        zw(
            "coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--db",
            str(tmp / "coordinator.db"),
            "--heartbeat-timeout",
            heartbeat_timeout,
            *job_args,
        ),
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url) or proc.poll() is not None, 60, "the coordinator")
    assert proc.poll() is None, (tmp / "coordinator.log").read_text()
    return proc, url


def start_worker(
    reaper: ProcessReaper, tmp: Path, url: str, name: str, *extra: str, token: str = TOKEN
) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{name}.log", "ab")
    return reaper.spawn(
        zw(
            "worker",
            "--coordinator",
            url,
            "--worker-id",
            name,
            "--bind",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--checkpoint-dir",
            str(tmp / "checkpoints"),
            "--telemetry-dir",
            str(tmp / "telemetry"),
            "--save-model",
            str(tmp / "model.safetensors"),
            *extra,
        ),
        env=env(token),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """Every live process whose command line mentions `marker` (a test's unique tmp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                (line for line in (entry / "status").read_text().splitlines() if line.startswith("State:")),
                "",
            )
        except OSError:
            continue
        if marker in cmdline and "zombie" not in state:
            found.append((int(entry.name), cmdline.strip()))
    return found


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_run(reaper: ProcessReaper, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start `zerowire run --output TMP/run ARGS` with its output in TMP/run.log; return the process, the
    coordinator URL it announced, and the log's path."""
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        command = zw("run", "--output", str(tmp_path / "run"), *args)
        run = reaper.spawn(command, env=env(), stdout=log, stderr=subprocess.STDOUT)
    url = wait_for(
        lambda: (m := re.search(r"coordinator at (https?://\S+)", log_path.read_text())) and m.group(1),
        60,
        "the coordinator URL",
    )
    return run, url, log_path
