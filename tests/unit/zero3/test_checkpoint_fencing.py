"""Checkpoint fencing by membership epoch: parts of different epochs never make one checkpoint, and a late
writer of an older epoch never replaces a part of a newer one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.unit.zero3.test_checkpoint import (
    JOB_HASH,
    STATE_NAMES,
    UNIT_NUMELS,
    full_tensors,
    rank_tensors,
    reassemble,
    save_all,
)
from worker.zero3 import checkpoint as ck
from worker.zero3.checkpoint import CheckpointError, latest_complete, save_shards, step_dir
from worker.zero3.reshard import load_resharded


def save_part(directory: Path, step: int, rank: int, world: int, epoch: int, seed: int) -> Path:
    tensors = rank_tensors(full_tensors(seed), world, rank)
    return save_shards(directory, step, rank, world, JOB_HASH, UNIT_NUMELS, tensors, {}, epoch=epoch)


def part_bytes(directory: Path, step: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(step_dir(directory, step).iterdir())}


def assert_holds(directory: Path | ck.CheckpointInfo, seed: int, new_world: int) -> None:
    parts = [
        load_resharded(directory, new_world, r, UNIT_NUMELS, job_hash=JOB_HASH) for r in range(new_world)
    ]
    got, want = reassemble(parts, new_world), full_tensors(seed)
    for name in STATE_NAMES:
        for k in range(len(UNIT_NUMELS)):
            assert torch.equal(got[name][k], want[name][k]), (name, k)


def test_a_stale_epoch_part_never_completes_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_all(tmp_path, 100, 3, seed=1, epoch=4)
    for rank in (0, 2):  # epoch 5 wrote two of its three parts of step 120 ...
        save_part(tmp_path, 120, rank, 3, epoch=5, seed=2)
    save_part(tmp_path, 120, 1, 3, epoch=4, seed=9)  # ... and a worker of epoch 4 wrote the third one late
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch) == (100, 4)
    warned = [r.getMessage() for r in caplog.records if "step-000120" in r.getMessage()]
    assert len(warned) == 1 and "epochs [5, 4, 5]" in warned[0], warned
    with pytest.raises(CheckpointError, match=r"epochs \[5, 4, 5\]"):
        load_resharded(step_dir(tmp_path, 120), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    assert_holds(tmp_path, seed=1, new_world=2)  # the root resolves to the older complete checkpoint
    # Epoch 5 then writes its own part 1: a newer epoch replaces an older part, and the checkpoint completes.
    save_part(tmp_path, 120, 1, 3, epoch=5, seed=2)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch, info.world_size) == (120, 5, 3)
    assert_holds(info, seed=2, new_world=3)


def test_a_newer_epoch_replacing_one_part_breaks_the_checkpoint_for_every_loader(tmp_path: Path) -> None:
    save_all(tmp_path, 50, 2, seed=3, epoch=6)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and info.epoch == 6
    save_part(tmp_path, 50, 0, 2, epoch=7, seed=3)  # identical tensors, a newer epoch
    assert latest_complete(tmp_path, JOB_HASH) is None
    with pytest.raises(CheckpointError, match=r"epochs \[7, 6\]"):
        load_resharded(step_dir(tmp_path, 50), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_resharded(tmp_path, 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    with pytest.raises(CheckpointError, match="replaced by epoch 7"):  # an info verified before the change
        load_resharded(info, 1, 0, UNIT_NUMELS, job_hash=JOB_HASH)


def test_a_late_write_of_an_older_epoch_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    save_all(tmp_path, 80, 2, seed=4, epoch=9)
    before = part_bytes(tmp_path, 80)
    for zombie_epoch in (8, 0):
        with pytest.raises(CheckpointError, match=f"epoch 9 wrote it, newer than epoch {zombie_epoch}"):
            save_part(tmp_path, 80, 1, 2, epoch=zombie_epoch, seed=5)
    assert part_bytes(tmp_path, 80) == before  # no file replaced, no temporary left behind
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch) == (80, 9)
    assert_holds(info, seed=4, new_world=2)
    # The same epoch may write its part again (a retried save), and a newer one may replace it.
    save_part(tmp_path, 80, 1, 2, epoch=9, seed=4)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch) == (80, 9)
    save_part(tmp_path, 80, 1, 2, epoch=10, seed=4)
    assert latest_complete(tmp_path, JOB_HASH) is None


def test_a_writer_racing_past_the_check_never_completes_a_mixed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both checks passed before the newer epoch wrote: whatever the older writer renames afterwards, the
    checkpoint is incomplete (its tensor file alone fails the checksum; with its manifest, the epoch)."""
    save_all(tmp_path, 30, 2, seed=6, epoch=2)
    save_all(tmp_path, 40, 2, seed=7, epoch=3)
    real_write = ck.write_atomic

    def tensor_file_only(path: Path, data: bytes) -> None:
        if path.suffix == ".json":
            raise OSError("the writer stopped before its manifest")
        real_write(path, data)

    monkeypatch.setattr(ck, "_refuse_if_newer", lambda path, epoch: None)
    monkeypatch.setattr(ck, "write_atomic", tensor_file_only)
    with pytest.raises(OSError, match="stopped"):
        save_part(tmp_path, 40, 1, 2, epoch=2, seed=8)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and info.step == 30
    monkeypatch.setattr(ck, "write_atomic", real_write)
    save_part(tmp_path, 40, 1, 2, epoch=2, seed=8)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch) == (30, 2)


@pytest.mark.parametrize("new_world", [1, 2, 5])
def test_a_checkpoint_of_one_epoch_is_complete_and_loads_at_other_world_sizes(
    tmp_path: Path, new_world: int
) -> None:
    save_all(tmp_path, 70, 3, seed=10, epoch=12)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.world_size, info.epoch) == (70, 3, 12)
    assert_holds(info, seed=10, new_world=new_world)
    assert_holds(step_dir(tmp_path, 70), seed=10, new_world=new_world)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda m: {**{k: v for k, v in m.items() if k != "epoch"}, "version": 1},
            "v1 manifests carry no membership epoch",
        ),
        (lambda m: {k: v for k, v in m.items() if k != "epoch"}, "no valid membership epoch: None"),
        (lambda m: {**m, "epoch": "3"}, "no valid membership epoch: '3'"),
        (lambda m: {**m, "epoch": -1}, "no valid membership epoch: -1"),
    ],
)
def test_a_manifest_without_a_valid_epoch_is_not_a_part(tmp_path: Path, change: object, match: str) -> None:
    save_all(tmp_path, 20, 2, seed=11, epoch=1)
    path = step_dir(tmp_path, 20) / "rank-00001-of-00002.json"
    assert callable(change)
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    assert latest_complete(tmp_path, JOB_HASH) is None
    with pytest.raises(CheckpointError, match=match):
        load_resharded(step_dir(tmp_path, 20), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    # Not a part, so nothing to protect: a writer of any epoch replaces it.
    save_part(tmp_path, 20, 1, 2, epoch=1, seed=11)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.epoch) == (20, 1)
