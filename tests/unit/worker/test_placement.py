"""Which GPU a worker trains on: ``--device cuda`` means the worker's own GPU on its host (its local index
modulo the visible GPUs), from a launcher's variable or claimed by a lock file; never all on GPU 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker import identity
from worker.identity import place_device


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Any:
    claimed: list[Any] = []
    monkeypatch.setattr(identity, "_claimed", claimed)
    for name in identity.LOCAL_INDEX_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    for f in claimed:
        f.close()


def test_explicit_devices_and_the_host_stay(tmp_path: Path) -> None:
    assert place_device("cpu", gpus=2, lock_dir=tmp_path) == "cpu"
    assert place_device("cuda:1", gpus=2, lock_dir=tmp_path) == "cuda:1"
    with pytest.raises(ValueError, match="no CUDA device"):
        place_device("cuda", gpus=0, lock_dir=tmp_path)


def test_workers_of_one_host_claim_distinct_gpus_then_share(tmp_path: Path, caplog: Any) -> None:
    # each call stands for another worker process: a lock file held by one is refused to the others
    assert [place_device("cuda", gpus=2, lock_dir=tmp_path) for _ in range(2)] == ["cuda:0", "cuda:1"]
    assert place_device("cuda", gpus=2, lock_dir=tmp_path) == "cuda:0"
    assert "claimed by another worker" in caplog.text
    identity._claimed.pop(0).close()  # the worker on cuda:0 ends: its GPU is free again
    assert place_device("cuda", gpus=2, lock_dir=tmp_path) == "cuda:0"


def test_a_launchers_local_index_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert place_device("cuda", gpus=2, lock_dir=tmp_path) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert place_device("cuda", gpus=4, lock_dir=tmp_path) == "cuda:2"
    assert list(tmp_path.iterdir()) == []  # nothing claimed
