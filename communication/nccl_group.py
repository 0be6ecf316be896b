"""The NCCL process group of one epoch, made so that the lane, not the library, decides when it ends
(communication/torchdist_group.py forms it, communication/nccl_watch.py enforces the deadlines).

- Made eagerly for the lane's GPU (`eager_connect_single_device`, what `device_id` does for
  `init_process_group`): the communicator exists when the epoch's group is formed, not at its first
  collective, so a member that cannot join fails the formation, within the rendezvous timeout.
- A non-blocking communicator (`config.blocking = 0`): `abort()` of a communicator whose peer died never
  blocks on that peer.
- The library's own timeout (`library_timeout`) is longer than any deadline the lane enforces, so the
  lane's watcher aborts first and its caller hears CollectiveTimeout or PeerLost, not the library.
- The environment, set before the first group of the process is made (the library reads it then):
  `TORCH_NCCL_ASYNC_ERROR_HANDLING=2` (clean up only). The default, 3, and 1 make the library's watchdog
  kill the whole process once it finds an error or a collective past its timeout: a worker that loses a
  peer must instead fail the step and form the next epoch. With 2 the watchdog at most aborts the
  communicator of a failed collective (a backstop: the lane aborts it first). A value that tears the
  process down is replaced, with a warning. `TORCH_NCCL_DUMP_ON_TIMEOUT=0` and
  `TORCH_NCCL_ENABLE_MONITORING=0` unless set: the library's heartbeat monitor ends the process after a
  timeout dump, or when the watchdog seems stuck (an abort under way can look stuck); the flight recorder
  of the contract layer (communication/recorder.py) dumps what the lane was doing instead.
  `TORCH_NCCL_NONBLOCKING_TIMEOUT` (how long the library waits on a non-blocking communicator's
  initialisation and teardown) defaults to the group's timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
CLEAN_UP_ONLY = "2"  # abort the communicator of a failed collective, never the process
TEAR_DOWN = ("1", "3")  # values that end the process
LIBRARY_TIMEOUT_FACTOR = 2.0
LIBRARY_TIMEOUT_MARGIN_S = 30.0


def library_timeout(deadline_s: float) -> float:
    """The group's own timeout for a lane whose calls have at most `deadline_s`: comfortably longer, so
    the lane's watcher always acts first."""
    return LIBRARY_TIMEOUT_FACTOR * deadline_s + LIBRARY_TIMEOUT_MARGIN_S


def prepare_environment(group_timeout_s: float, environ: dict[str, str] | None = None) -> None:
    """Set the library's variables (module doc) before a group is made; `environ` defaults to the
    process's."""
    env: Any = os.environ if environ is None else environ
    handling = env.get(ASYNC_ERROR_HANDLING)
    if handling in TEAR_DOWN:
        log.warning(
            "%s=%s would let NCCL's watchdog end the process when a peer dies; the lane sets %s (it aborts "
            "the communicator itself and fails the step)",
            ASYNC_ERROR_HANDLING,
            handling,
            CLEAN_UP_ONLY,
        )
    if handling != "0":  # 0 (no handling) keeps the process alive too: leave it
        env[ASYNC_ERROR_HANDLING] = CLEAN_UP_ONLY
    env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    env.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    env.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(max(1, round(group_timeout_s))))


def make_nccl_group(store: Any, rank: int, world_size: int, device: torch.device, deadline_s: float) -> Any:
    """A ProcessGroupNCCL of `world_size` ranks on `store`, connected now on `device` (module doc);
    `deadline_s` is the longest deadline the lane gives a call."""
    timeout = library_timeout(deadline_s)
    prepare_environment(timeout)
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    options._timeout = datetime.timedelta(seconds=timeout)
    config = getattr(options, "config", None)
    if config is not None:  # a build whose NCCL has communicator configs
        config.blocking = 0
    pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
    pg.eager_connect_single_device(device)
    return pg
