"""RendezvousStore: the torch.distributed key-value store a worker hosts for its whole life.

The co-located members of an epoch meet through one store to form that epoch's process group. When a
worker hosts one from its start (on port 0, so nothing has to be guessed or probed per epoch) and
reports its address with its registration, every epoch's group on its host forms through the same
store, joined by all members as clients (`TorchDistBackend.set_group(..., host_store=False)`). Every
epoch's keys live under their own job/epoch prefix, so epochs and jobs never meet in it.

The store listens on `host` alone (loopback by default): the library's own server would listen on every
interface, so this module binds the socket itself and hands it over. Only the workers of one machine
meet through it, and nothing off the machine can read or write its keys.

The store's server runs in the library's own native thread; `close()` stops it and frees the port.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import threading
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)


class RendezvousStore:
    def __init__(self, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        """Bind a store server on `host` (and no other interface), port 0 (ValueError on an empty host or a
        bad timeout; OSError when the address cannot be bound)."""
        if not host or (":" in host and not _is_ipv6(host)):
            raise ValueError(f"host must be a host name or IP address, got {host!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.host = host
        self._lock = threading.Lock()
        family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(128)
            port = int(listener.getsockname()[1])
        except OSError:
            listener.close()
            raise
        fd = listener.detach()  # the store owns the listening socket from here (and closes it)
        try:
            self._store: Any = dist.TCPStore(
                host, port, None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False,
                master_listen_fd=fd,
            )  # fmt: skip
        except RuntimeError as exc:
            socket.close(fd)
            raise OSError(f"cannot host a rendezvous store on {host}: {exc}") from exc
        self.port: int = port
        log.info("rendezvous store listening on %s", self.address)

    @property
    def address(self) -> str:
        """ "host:port" as members pass it to `set_group` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"{host}:{self.port}"

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._store is None

    def close(self) -> None:
        """Stop the server (idempotent); a worker does so when it leaves: a group that has not yet
        finished forming through it (NCCL forms its communicator at the first collective) fails."""
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            del store  # the last reference: the native server stops and releases its port
            log.info("rendezvous store on %s:%d closed", self.host, self.port)

    def __enter__(self) -> RendezvousStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
