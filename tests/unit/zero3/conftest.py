"""Every engine test runs torch on one thread (results do not depend on it; timing and CPU share do)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
