"""A worker daemon whose training thread leaves the job's sequence of calls for good after committing one
step, while its heartbeat lives on: the stalled member of the liveness and diagnosis tests.

`python -m tests.integration.stall_worker URL WORKER_ID DIR STEP [MODE [HOST_ID]]` (the cluster token in
ZEROWIRE_TOKEN): the worker trains like `zerowire worker` (checkpoints in DIR/checkpoints, telemetry in
DIR/telemetry) and, once step STEP is committed and reported, writes the wall time to DIR/WORKER_ID.blocked
and then, by MODE:

- ``block`` (the default): blocks its training thread, in no collective;
- ``exchange``: waits in an exchange (key ``STRAY_KEY``) that no other member makes, where the others are in
  the next step's gathers: a member in another collective (give each worker its own HOST_ID, so that the
  members meet on the gRPC lane, whose calls are matched by key).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from worker.daemon import WorkerDaemon
from worker.identity import WorkerConfig, default_host_id
from worker.manager import Trainers

STRAY_KEY = 123_456_789  # an exchange key the engine never uses


class Stalling(Trainers):
    """The default trainers, whose step callback leaves the sequence of calls after step `at_step`."""

    def __init__(self, at_step: int, marker: Path, mode: str = "block") -> None:
        self.at_step, self.marker, self.mode = at_step, marker, mode

    def __call__(self, job: Any, group: Any, lane: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = super().__call__(job, group, lane, *args, **kwargs)
        run = trainer.run
        at_step, marker, mode = self.at_step, self.marker, self.mode

        def run_stalling(*, on_step: Callable[[Any], None], **rest: Any) -> Any:
            def step(report: Any) -> None:
                on_step(report)
                if report.step == at_step:
                    marker.write_text(repr(time.time()))
                    log = logging.getLogger("stall_worker")
                    if mode == "exchange":
                        log.warning("waiting in an exchange no other member makes")
                        stray = torch.zeros(1, dtype=torch.int64)
                        lane.exchange(stray, group=group, key=STRAY_KEY, timeout=600.0).wait(600.0)
                    log.warning("blocking the training thread for good")
                    threading.Event().wait()

            return run(on_step=step, **rest)

        trainer.run = run_stalling  # type: ignore[method-assign]
        return trainer


def main(argv: list[str]) -> int:
    url, worker_id, folder, at_step = argv[0], argv[1], Path(argv[2]), int(argv[3])
    mode = argv[4] if len(argv) > 4 else "block"
    host_id = argv[5] if len(argv) > 5 else default_host_id()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = WorkerConfig(
        coordinator=url,
        token=os.environ["ZEROWIRE_TOKEN"],
        worker_id=worker_id,
        bind="127.0.0.1:0",
        host_id=host_id,
        device="cpu",
        threads=1,
        checkpoint_dir=folder / "checkpoints",
        telemetry_dir=folder / "telemetry",
        save_model=folder / "model.safetensors",
    )
    for path in (cfg.checkpoint_dir, cfg.telemetry_dir):
        assert path is not None
        path.mkdir(parents=True, exist_ok=True)
    daemon = WorkerDaemon(cfg, trainers=Stalling(at_step, folder / f"{worker_id}.blocked", mode))
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
