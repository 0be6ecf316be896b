"""A local cluster of real processes on loopback: one coordinator and N workers.

Every child runs in its own session (process group) and is stopped by PID: SIGTERM first (workers
leave gracefully), SIGKILL after a grace period. `LocalCluster` is a context manager and also
registers an atexit hook, so no process is left behind on an error or Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# glibc malloc thresholds for worker processes. Large buffers come and go every step (gathered units, gradient
# slices): with glibc's default thresholds each one is a fresh mmap and thousands of page faults per
# collective; keeping them in the heap made steps 8-10% faster on a 2-core host.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_job_toml(path: Path, job: dict[str, Any]) -> None:
    lines = ["[job]"] + [f"{key} = {toml_value(value)}" for key, value in sorted(job.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    output: Path
    workers: int
    job_file: Path
    threads: int = 1
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    data_dir: Path | None = None
    data_workers: int | None = None  # loader processes per worker of a streamed dataset (None: its default)
    python: str = sys.executable
    host: str = "127.0.0.1"
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # the cluster token
    read_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # operator tokens: the
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # coordinator's only
    extra_worker_args: list[str] = field(default_factory=list)
    extra_coordinator_args: list[str] = field(default_factory=list)
    coordinator: Child | None = None
    children: list[Child] = field(default_factory=list)
    port: int = 0
    tls_dir: Path | None = None  # ca.pem + localhost.pem/.key (zerowire.certs.make_loopback_certs): all TLS
    hosts: int = 1  # simulated machines: worker i gets host id host_id(i)

    def host_id(self, index: int) -> str:
        """The simulated host of worker `index`: the workers are spread in contiguous blocks over
        `hosts` host ids (one host: every worker shares "localhost", as on a real single machine)."""
        if not 1 <= self.hosts <= self.workers:
            raise ValueError(f"hosts must be between 1 and the {self.workers} workers, got {self.hosts}")
        return "localhost" if self.hosts == 1 else f"host{index * self.hosts // self.workers}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://{self.host}:{self.port}"

    def tls_args(self) -> list[str]:
        """The --tls-* options of every child (REST over HTTPS, mutual TLS on gRPC); none without TLS."""
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        cert, key, ca = d / "localhost.pem", d / "localhost.key", d / "ca.pem"
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]

    def client_verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify` for REST clients of this cluster's coordinator."""
        from communication.tls import client_ssl_context

        return client_ssl_context(self.tls_dir / "ca.pem" if self.tls_dir else None)

    @property
    def telemetry_dir(self) -> Path:
        return self.output / "telemetry"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    @property
    def model_path(self) -> Path:
        return self.output / "model.safetensors"

    def __enter__(self) -> LocalCluster:
        atexit.register(self.stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        atexit.unregister(self.stop)

    def _env(self, operator_tokens: bool = False) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("ZEROWIRE_READ_TOKEN", "ZEROWIRE_ADMIN_TOKEN")
        }
        env["ZEROWIRE_TOKEN"] = self.token  # never on a command line (visible in ps)
        if operator_tokens:  # the coordinator's; workers get the cluster token only
            env["ZEROWIRE_READ_TOKEN"], env["ZEROWIRE_ADMIN_TOKEN"] = self.read_token, self.admin_token
        env.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in WORKER_MALLOC_ENV.items():
            env.setdefault(key, value)
        return env

    def _spawn(self, name: str, args: list[str]) -> Child:
        (self.output / "logs").mkdir(parents=True, exist_ok=True)
        log_path = self.output / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")
        proc = subprocess.Popen(
            [self.python, "-m", "zerowire.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self._env(operator_tokens=name == "coordinator"),
            start_new_session=True,
            # children die with a parent killed by SIGKILL too (no watchdog needed)
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
        return child

    def coordinator_args(self) -> list[str]:
        return [
            "coordinator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--db",
            str(self.output / "coordinator.db"),
            "--job",
            str(self.job_file),
            *self.tls_args(),
            *self.extra_coordinator_args,
        ]

    def worker_args(self, index: int) -> list[str]:
        args = [
            "worker",
            "--coordinator",
            self.url,
            "--worker-id",
            f"worker-{index}",
            "--bind",
            f"{self.host}:0",
            "--host-id",
            self.host_id(index),
            "--device",
            self.devices[index % len(self.devices)],
            "--checkpoint-dir",
            str(self.checkpoint_dir),
            "--telemetry-dir",
            str(self.telemetry_dir),
            "--save-model",
            str(self.model_path),
            "--threads",
            str(self.threads),
        ]
        if self.data_dir is not None:
            args += ["--data-dir", str(self.data_dir)]
        if self.data_workers is not None:
            args += ["--data-workers", str(self.data_workers)]
        return args + self.tls_args() + self.extra_worker_args

    def start_coordinator(self, timeout_s: float = 60.0) -> None:
        """Start the coordinator on `port`, or, when it is 0, on a free port of `host` (another one, up to
        three times, when the probed port was taken meanwhile)."""
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port(self.host)
            self.coordinator = self._spawn("coordinator", self.coordinator_args())
            if self._healthy(self.coordinator, timeout_s):
                return
            # It exited (the probed port may have been taken meanwhile): try another port.
        raise RuntimeError(f"the coordinator exited; see {self.output / 'logs' / 'coordinator.log'}")

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator, as a crash would (its state file stays)."""
        if self.coordinator is not None and self.coordinator.alive():
            _signal(self.coordinator, signal.SIGKILL)
            self.coordinator.proc.wait(timeout=10)

    def restart_coordinator(self, timeout_s: float = 60.0) -> None:
        """Start the coordinator again on its port and state file (after `kill_coordinator`)."""
        if self.coordinator is not None and self.coordinator.alive():
            raise RuntimeError("the coordinator is still running")
        self.coordinator = self._spawn("coordinator", self.coordinator_args())
        if not self._healthy(self.coordinator, timeout_s):
            raise RuntimeError(
                f"the coordinator did not start again on port {self.port}; "
                f"see {self.output / 'logs' / 'coordinator.log'}"
            )

    def _healthy(self, child: Child, timeout_s: float) -> bool:
        """Wait until `child` (the coordinator) answers /healthz: True; False if it exited first."""
        from worker.coordinator_client import SyncCoordinatorClient

        deadline = time.monotonic() + timeout_s
        with SyncCoordinatorClient(
            self.url, self.token, timeout_s=1.0, verify=self.client_verify()
        ) as client:
            while time.monotonic() < deadline and child.alive():
                if client.healthy():
                    log.debug("coordinator up at %s", self.url)
                    return True
                time.sleep(0.2)
        if child.alive():
            raise RuntimeError(f"the coordinator did not become healthy within {timeout_s:.0f}s")
        return False

    def start_workers(self) -> None:
        self.telemetry_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.workers):
            self._spawn(f"worker-{i}", self.worker_args(i))

    def worker_children(self) -> list[Child]:
        """Every worker process started, a restarted worker's earlier processes included."""
        return [c for c in self.children if c.name.startswith("worker-")]

    def current_workers(self) -> dict[str, Child]:
        """The latest process of each worker, by name (= worker id)."""
        return {c.name: c for c in self.worker_children()}

    def running(self, status: dict[str, Any]) -> bool:
        """Whether the run goes on: some worker process is alive (the coordinator's `status` is the
        answer the run read last; the local processes say it all)."""
        return any(c.alive() for c in self.worker_children())

    def exit_codes(self, status: dict[str, Any]) -> dict[str, int | None]:
        """The exit code of each worker's latest process, by worker id (None: still running)."""
        return {name: c.proc.returncode for name, c in self.current_workers().items()}

    def restart_worker(self, name: str) -> Child:
        """Start worker `name` (``worker-i``) again, with the same worker id and arguments, once its
        process has ended; it registers again and joins the running job."""
        suffix = name.removeprefix("worker-")
        index = int(suffix) if name.startswith("worker-") and suffix.isdigit() else -1
        if not 0 <= index < self.workers:
            raise ValueError(f"no worker named {name!r} in a cluster of {self.workers}")
        current = self.current_workers().get(name)
        if current is not None and current.alive():
            raise RuntimeError(f"{name} is still running")
        return self._spawn(name, self.worker_args(index))

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every child: workers first (SIGTERM, they leave), then the coordinator; SIGKILL stragglers."""
        ordered = self.worker_children() + [c for c in self.children if not c.name.startswith("worker-")]
        for group in (ordered[: len(self.worker_children())], ordered[len(self.worker_children()) :]):
            for child in group:
                if child.proc.poll() is None:
                    _signal(child, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in group:
                try:
                    child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for child in group:
                if child.proc.poll() is None:  # a reaped leader's pid may be reused: never signal it
                    _signal(child, signal.SIGKILL)
                try:
                    child.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.error("process %d (%s) did not die", child.proc.pid, child.name)
        for child in self.children:
            child.log_file.close()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _signal(child: Child, sig: signal.Signals) -> None:
    try:
        os.killpg(child.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
