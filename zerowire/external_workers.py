"""A run whose workers another program starts: a scheduler's tasks (`deploy/slurm/zerowire.sbatch`), each
running `zerowire worker` against this run's coordinator and writing into its output folder (telemetry,
checkpoints, the model), which must be shared with every node.

The coordinator runs here as in a local cluster; the run goes on until the coordinator says the job
finished and no worker is alive any more (each left), and ends there. The launcher may leave each worker's
final exit code in ``logs/WORKER_ID.exit`` (one integer); the summary reports them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerowire.localcluster import LocalCluster

log = logging.getLogger(__name__)

EXIT_SUFFIX = ".exit"


def job_over(status: dict[str, Any]) -> bool:
    """The coordinator's status says the job finished and every worker it knows has gone (left or dead)."""
    workers = status.get("workers", [])
    return status.get("state") == "finished" and not any(w.get("state") == "alive" for w in workers)


def read_exit_codes(folder: Path) -> dict[str, int | None]:
    """``WORKER_ID.exit`` files of `folder`: worker id -> its exit code (None: not an integer)."""
    codes: dict[str, int | None] = {}
    for path in sorted(folder.glob(f"*{EXIT_SUFFIX}")):
        text = path.read_text(errors="replace").strip()
        codes[path.name.removesuffix(EXIT_SUFFIX)] = int(text) if text.lstrip("-").isdigit() else None
    return codes


@dataclass
class ExternalWorkers(LocalCluster):
    """The coordinator of a run whose `workers` are started elsewhere: nothing is spawned for them."""

    exit_wait_s: float = 10.0  # how long the summary waits for the launcher's exit files

    @property
    def logs_dir(self) -> Path:
        return self.output / "logs"

    def start_workers(self) -> None:
        """Make the folders the workers write into; the workers themselves are the launcher's."""
        for folder in (self.telemetry_dir, self.checkpoint_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def running(self, status: dict[str, Any]) -> bool:
        return not job_over(status)

    def exit_codes(self, status: dict[str, Any]) -> dict[str, int | None]:
        """The exit codes the launcher left in ``logs/``, waiting up to `exit_wait_s` for those of the
        workers `status` names (a launcher writes one just after its worker exits)."""
        expected = {str(w["worker_id"]) for w in status.get("workers", []) if w.get("worker_id")}
        deadline = time.monotonic() + self.exit_wait_s
        codes = read_exit_codes(self.logs_dir)
        while not expected <= set(codes) and time.monotonic() < deadline:
            time.sleep(0.2)
            codes = read_exit_codes(self.logs_dir)
        missing = sorted(expected - set(codes))
        if missing:
            log.warning("no exit code from the launcher for %s", ", ".join(missing))
        return {**dict.fromkeys(missing), **codes}
