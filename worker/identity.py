"""Who a worker is: its configuration, machine identity, device and advertised gRPC address."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from communication.tls import TlsConfig
from jobspec import JobSpec, check_timeouts

log = logging.getLogger(__name__)
COORDINATOR_TIMEOUTS = ("collective_timeout_s", "startup_timeout_s", "barrier_timeout_s")


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    token: str | None = None
    worker_id: str | None = None
    bind: str = "0.0.0.0:0"
    advertise: str | None = None
    host_id: str = ""
    device: str = "auto"
    data_dir: Path | None = None
    checkpoint_dir: Path | None = None
    save_model: Path = Path("zerowire-model.safetensors")
    telemetry_dir: Path | None = None
    min_workers: int | None = None
    threads: int | None = None
    data_workers: int | None = None  # loader processes of a streamed dataset (None: default_data_workers())
    expect_job_hash: str | None = None
    # The coordinator's values (GET /job) replace these three; see adopt_timeouts.
    collective_timeout_s: float = 30.0  # a collective once the epoch has committed a step
    startup_timeout_s: float = (
        120.0  # a collective, or a stall, before that (model build, resume, first steps)
    )
    barrier_timeout_s: float = 600.0
    barrier_poll_s: float = 10.0
    coordinator_grace_s: float = 30.0  # coordinator away this long: warn (give up after the barrier timeout)
    stop_grace_s: float = 1.0
    max_reforms: int = 20
    tls: TlsConfig | None = None  # TLS for gRPC (mutual with a CA) and the CA that verifies the coordinator


def default_data_workers() -> int:
    """Loader processes when not set: half the CPUs, at least 1 and at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_host_id() -> str:
    """The machine's identity: /etc/machine-id when there is one, else the host name."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value[:64]
    return socket.gethostname()[:64]


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' or 'v6' -> (host, port or default)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port) if port else default_port
    return text, default_port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _route_ip_towards(url: str) -> str:
    """The local address the kernel would use to reach the coordinator (no packet is sent)."""
    target = urlsplit(url if "://" in url else f"http://{url}").hostname or "127.0.0.1"
    try:
        if ipaddress.ip_address(target).is_loopback:
            return target
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def advertised_address(cfg: WorkerConfig, bound_port: int) -> tuple[str, int]:
    """The address peers dial: --advertise if given (its port defaults to the bound one), else the bind
    host, else (wildcard bind) the local address on the route to the coordinator."""
    if cfg.advertise:
        host, port = split_host_port(cfg.advertise, bound_port)
        return host, int(port or bound_port)
    bind_host, _ = split_host_port(cfg.bind)
    if bind_host in ("", "0.0.0.0", "::", "[::]"):
        return _route_ip_towards(cfg.coordinator), bound_port
    return bind_host, bound_port


LOCAL_INDEX_VARIABLES = ("ZEROWIRE_LOCAL_INDEX", "LOCAL_RANK", "SLURM_LOCALID")
_claimed: list[Any] = []  # the lock file of the GPU this process claimed, open for its life


def place_device(device: str, gpus: int | None = None, lock_dir: Path | None = None) -> str:
    """The device a worker trains on. ``cuda`` (and ``auto`` where CUDA is available) means
    ``cuda:<local index>``: the worker's index among the workers of its host, modulo the visible GPUs,
    taken from ``ZEROWIRE_LOCAL_INDEX``, ``LOCAL_RANK`` or ``SLURM_LOCALID`` when set (launchers set them),
    and otherwise claimed: the lowest GPU whose lock file (in ``lock_dir``, default the temporary folder)
    no other live worker holds. A worker that finds every GPU claimed shares the first, with a warning.
    ``cpu`` and ``cuda:<i>`` stay as they are."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return device
    count = torch.cuda.device_count() if gpus is None else gpus
    if count < 1:
        raise ValueError("--device cuda: no CUDA device is visible")
    for name in LOCAL_INDEX_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return f"cuda:{int(value) % count}"
    import fcntl
    import tempfile

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")[:64]
    folder = lock_dir or Path(tempfile.gettempdir())
    for index in range(count):
        f = open(folder / f"zerowire-{os.getuid()}-gpus-{visible}-{index}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _claimed.append(f)  # released when this process ends, however it ends
        return f"cuda:{index}"
    log.warning("every one of the %d visible GPUs is claimed by another worker: sharing cuda:0", count)
    return "cuda:0"


def describe_device(device: str) -> tuple[str, str, int | None]:
    """(torch device string, human name, memory in bytes) for auto|cpu|cuda[:i]."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index}", str(props.name), int(props.total_memory)
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda[:i], not {device!r}")
    memory: int | None = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return "cpu", f"cpu x{os.cpu_count()}", memory


def parse_job_answer(body: dict[str, Any]) -> tuple[JobSpec, str]:
    """`GET /job` -> (JobSpec, the hash the coordinator announces)."""
    spec = body.get("job", body.get("spec"))
    if not isinstance(spec, dict):
        raise ValueError(f"GET /job answered no job spec: keys {sorted(body)}")
    announced = body.get("hash", body.get("job_hash"))
    if not isinstance(announced, str):
        raise ValueError("GET /job answered no job hash")
    return JobSpec(**spec), announced


def adopt_timeouts(cfg: WorkerConfig, job_answer: Mapping[str, Any]) -> WorkerConfig:
    """``cfg`` with the collective, start-up and barrier timeouts of the coordinator's `GET /job` answer:
    the coordinator's values win, so every worker of a job uses the same. ValueError if one is missing."""
    values: list[float] = []
    for key in COORDINATOR_TIMEOUTS:
        v = job_answer.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"GET /job answered no valid {key}: {v!r}")
        values.append(float(v))
    log.info(
        "timeouts from the coordinator: %s",
        ", ".join(f"{k} {v:g}" for k, v in zip(COORDINATOR_TIMEOUTS, values, strict=True)),
    )
    collective, startup, barrier = values
    return dataclasses.replace(
        cfg, collective_timeout_s=collective, startup_timeout_s=startup, barrier_timeout_s=barrier
    )


def check_worker_timeouts(cfg: WorkerConfig, heartbeat_interval_s: float, heartbeat_timeout_s: float) -> None:
    """ValueError unless the heartbeat settings and ``cfg``'s timeouts nest (jobspec.check_timeouts)."""
    check_timeouts(
        heartbeat_interval_s,
        heartbeat_timeout_s,
        cfg.collective_timeout_s,
        cfg.startup_timeout_s,
        cfg.barrier_timeout_s,
    )
