"""Shared test fixtures: free ports, process cleanup by PID, single-threaded torch.

Torch runs single-threaded in tests: on a small shared CPU, intra-op threads that must meet at every
kernel make small models many times slower and their timing far noisier."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest
import torch


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessReaper:
    """Starts subprocesses in their own process group and kills every one by PID at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def reaper() -> Iterator[ProcessReaper]:
    r = ProcessReaper()
    try:
        yield r
    finally:
        r.kill_all()


@pytest.fixture(autouse=True)
def _single_thread_torch() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
