"""A worker daemon whose training thread blocks for good after committing one step, while its heartbeat
lives on: the stalled member of the liveness tests.

`python -m tests.integration.stall_worker URL WORKER_ID DIR STEP` (the cluster token in ZEROWIRE_TOKEN):
the worker trains like `zerowire worker` (checkpoints in DIR/checkpoints, telemetry in DIR/telemetry) and,
once step STEP is committed and reported, writes the wall time to DIR/WORKER_ID.blocked and blocks its
training thread.
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

from worker.daemon import WorkerDaemon
from worker.identity import WorkerConfig, default_host_id
from worker.manager import Trainers


class Stalling(Trainers):
    """The default trainers, whose step callback blocks the training thread after step `at_step`."""

    def __init__(self, at_step: int, marker: Path) -> None:
        self.at_step, self.marker = at_step, marker

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer = super().__call__(*args, **kwargs)
        run = trainer.run
        at_step, marker = self.at_step, self.marker

        def run_stalling(*, on_step: Callable[[Any], None], **rest: Any) -> Any:
            def step(report: Any) -> None:
                on_step(report)
                if report.step == at_step:
                    marker.write_text(repr(time.time()))
                    logging.getLogger("stall_worker").warning("blocking the training thread for good")
                    threading.Event().wait()

            return run(on_step=step, **rest)

        trainer.run = run_stalling  # type: ignore[method-assign]
        return trainer


def main(argv: list[str]) -> int:
    url, worker_id, folder, at_step = argv[0], argv[1], Path(argv[2]), int(argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = WorkerConfig(
        coordinator=url,
        token=os.environ["ZEROWIRE_TOKEN"],
        worker_id=worker_id,
        bind="127.0.0.1:0",
        host_id=default_host_id(),
        device="cpu",
        threads=1,
        checkpoint_dir=folder / "checkpoints",
        telemetry_dir=folder / "telemetry",
        save_model=folder / "model.safetensors",
    )
    for path in (cfg.checkpoint_dir, cfg.telemetry_dir):
        assert path is not None
        path.mkdir(parents=True, exist_ok=True)
    daemon = WorkerDaemon(cfg, trainers=Stalling(at_step, folder / f"{worker_id}.blocked"))
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
