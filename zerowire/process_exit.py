"""Ending a process that used torch.distributed once its work is closed and written."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Flush the logs and standard streams, then exit with `code` at once. The interpreter's teardown is
    skipped: torch.distributed's native threads can abort the process there (SIGABRT, "terminate called
    without an active exception") after the work is done, and tearing torch down costs seconds of CPU."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
