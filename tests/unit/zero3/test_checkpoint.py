"""Sharded checkpoints: round trips, re-sharding to other world sizes, corruption, crashes, pruning."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ProcessReaper
from tests.unit.zero3 import test_optim as ref
from worker.zero3.checkpoint import (
    CheckpointError,
    latest_complete,
    prune,
    save_shards,
    step_dir,
)
from worker.zero3.plan import shard_range
from worker.zero3.reshard import load_resharded

REPO = Path(__file__).resolve().parents[3]
JOB_HASH = "a" * 64
EPOCH = 3  # the membership epoch that writes the checkpoints of these tests
# Awkward unit sizes: one smaller than some world sizes (ranks with only padding), primes, an exact multiple.
UNIT_NUMELS = [1, 7, 97, 120, 1001]
STATE_NAMES = ["param", "exp_avg", "exp_avg_sq"]


def full_tensors(seed: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: [torch.randn(n, generator=g) for n in UNIT_NUMELS] for name in STATE_NAMES}


def rank_tensors(full: dict[str, list[torch.Tensor]], world: int, rank: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, units in full.items():
        for k, t in enumerate(units):
            start, stop = shard_range(t.numel(), world, rank)
            padded = torch.zeros((stop - start) * world)
            padded[: t.numel()] = t
            out[f"u{k}.{name}"] = padded[start:stop].clone()
    out["step"] = torch.tensor(42, dtype=torch.int64)
    if rank == 0:
        out["buffer.bn.running_mean"] = torch.arange(5, dtype=torch.float32)
        out["buffer.bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    return out


def save_all(
    directory: Path, step: int, world: int, seed: int = 0, job_hash: str = JOB_HASH, epoch: int = EPOCH
) -> None:
    full = full_tensors(seed)
    for r in range(world):
        save_shards(
            directory,
            step,
            r,
            world,
            job_hash,
            UNIT_NUMELS,
            rank_tensors(full, world, r),
            {"loss": 1.5, "r": r},
            epoch=epoch,
        )


def reassemble(parts: list[dict[str, torch.Tensor]], world: int) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name in STATE_NAMES:
        units = []
        for k, n in enumerate(UNIT_NUMELS):
            flat = torch.cat([p[f"u{k}.{name}"] for p in parts])
            start, stop = shard_range(n, world, 0)
            assert flat.numel() == (stop - start) * world
            assert torch.all(flat[n:] == 0), "padding must be zero"
            units.append(flat[:n])
        out[name] = units
    return out


def test_round_trip_at_the_same_world_size(tmp_path: Path) -> None:
    save_all(tmp_path, 120, 3)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None
    assert (info.step, info.world_size, info.unit_numels) == (120, 3, tuple(UNIT_NUMELS))
    assert info.extra == {"loss": 1.5, "r": 0} and info.epoch == EPOCH
    assert (tmp_path / "step-000120" / "rank-00001-of-00003.safetensors").is_file()
    full = full_tensors(0)
    for r in range(3):
        got = load_resharded(info, 3, r, UNIT_NUMELS, job_hash=JOB_HASH)
        want = rank_tensors(full, 3, 0)
        want.update(rank_tensors(full, 3, r))  # sharded from rank r, replicated from rank 0
        assert set(got) == set(want)
        for name, t in want.items():
            assert torch.equal(got[name], t) and got[name].dtype == t.dtype, name
    manifest = json.loads((tmp_path / "step-000120" / "rank-00002-of-00003.json").read_text())
    assert manifest["padded_numels"] == [3, 9, 99, 120, 1002]
    assert manifest["rank"] == 2 and len(manifest["sha256"]) == 64 and manifest["epoch"] == EPOCH


@pytest.mark.parametrize("new_world", [1, 2, 4, 5, 8])
def test_save_at_3_load_at_other_world_sizes(tmp_path: Path, new_world: int) -> None:
    save_all(tmp_path, 10, 3, seed=1)
    parts = [load_resharded(tmp_path, new_world, r, UNIT_NUMELS, job_hash=JOB_HASH) for r in range(new_world)]
    got = reassemble(parts, new_world)
    want = full_tensors(1)
    for name in STATE_NAMES:
        for k in range(len(UNIT_NUMELS)):
            assert torch.equal(got[name][k], want[name][k]), (name, k)
    for p in parts:
        assert torch.equal(p["buffer.bn.running_mean"], torch.arange(5, dtype=torch.float32))
        assert int(p["buffer.bn.num_batches_tracked"]) == 7 and int(p["step"]) == 42


def test_chain_of_reshards_is_lossless(tmp_path: Path) -> None:
    save_all(tmp_path, 1, 3, seed=2)
    world = 3
    for step, new_world in enumerate([5, 2, 4, 1], start=2):
        for r in range(new_world):
            t = load_resharded(tmp_path, new_world, r, UNIT_NUMELS, job_hash=JOB_HASH)
            save_shards(tmp_path, step, r, new_world, JOB_HASH, UNIT_NUMELS, t, {}, epoch=step)
        world = new_world
    info = latest_complete(tmp_path)
    assert info is not None and (info.step, info.world_size) == (5, world)
    got = reassemble([load_resharded(info, 2, r, UNIT_NUMELS, job_hash=JOB_HASH) for r in range(2)], 2)
    want = full_tensors(2)
    assert all(torch.equal(got[n][k], want[n][k]) for n in STATE_NAMES for k in range(len(UNIT_NUMELS)))


def test_corrupt_file_is_a_clear_error_and_not_latest(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 2)
    save_all(tmp_path, 20, 2, seed=5)
    victim = step_dir(tmp_path, 20) / "rank-00001-of-00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the tensor payload
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_resharded(step_dir(tmp_path, 20), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and info.step == 10
    # An info obtained before the corruption must not load the corrupt bytes either.
    save_all(tmp_path, 30, 2)
    info30 = latest_complete(tmp_path, JOB_HASH)
    assert info30 is not None and info30.step == 30
    (step_dir(tmp_path, 30) / "rank-00000-of-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_resharded(info30, 2, 1, UNIT_NUMELS, job_hash=JOB_HASH)


def test_missing_rank_is_a_clear_error(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 3)
    (step_dir(tmp_path, 10) / "rank-00002-of-00003.json").unlink()
    with pytest.raises(CheckpointError, match="part 2 of 3 is missing"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    assert latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_resharded(tmp_path, 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)


def test_missing_tensor_file_is_a_clear_error(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 2)
    (step_dir(tmp_path, 10) / "rank-00001-of-00002.safetensors").unlink()
    assert latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="unreadable"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)


def test_wrong_job_hash_or_model_is_a_clear_error(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 2)
    other = "b" * 64
    assert latest_complete(tmp_path, other) is None
    with pytest.raises(CheckpointError, match="job hash"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=other)
    with pytest.raises(CheckpointError, match="job hash"):
        load_resharded(tmp_path, 2, 0, UNIT_NUMELS, job_hash=other)
    with pytest.raises(CheckpointError, match="unit sizes"):
        load_resharded(tmp_path, 2, 0, [*UNIT_NUMELS[:-1], 1000], job_hash=JOB_HASH)


def test_parts_that_disagree_are_not_a_checkpoint(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 2)
    full = full_tensors(0)
    save_shards(tmp_path, 10, 1, 2, "c" * 64, UNIT_NUMELS, rank_tensors(full, 2, 1), {}, epoch=EPOCH)
    assert latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="disagrees"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)


def test_manifest_naming_another_file_or_malformed_is_rejected(tmp_path: Path) -> None:
    save_all(tmp_path, 10, 2)
    path = step_dir(tmp_path, 10) / "rank-00001-of-00002.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "file": "../../elsewhere.safetensors"}))
    assert latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="names file"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_resharded(step_dir(tmp_path, 10), 2, 0, UNIT_NUMELS, job_hash=JOB_HASH)


def test_bad_save_input_writes_nothing(tmp_path: Path) -> None:
    good = rank_tensors(full_tensors(0), 2, 0)
    bad_shard = {**good, "u3.param": torch.zeros(61)}
    cases: list[tuple[dict[str, object], str]] = [
        (dict(rank=2, tensors=good), "not in a world"),
        (dict(rank=0, tensors=bad_shard), "u3.param"),
        (dict(rank=0, tensors={**good, "u9.param": torch.zeros(1)}), "unit 9"),
        (dict(rank=0, tensors=good, extra={"x": object()}), "JSON"),
        (dict(rank=0, tensors=good, job_hash=""), "job_hash"),
        (dict(rank=0, tensors=good, epoch=-1), "epoch"),
        (dict(rank=0, tensors=good, epoch=True), "epoch"),
        (dict(rank=0, tensors=good, epoch=2.0), "epoch"),
    ]
    for kw, match in cases:
        args: dict[str, object] = dict(
            directory=tmp_path,
            step=5,
            world_size=2,
            job_hash=JOB_HASH,
            unit_numels=UNIT_NUMELS,
            extra={},
            epoch=EPOCH,
        )
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            save_shards(**args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_views_sharing_one_buffer_are_saved(tmp_path: Path) -> None:
    buf = torch.arange(12, dtype=torch.float32)
    save_shards(tmp_path, 0, 0, 1, JOB_HASH, [4, 8], {"u0.param": buf[:4], "u1.param": buf[4:]}, {}, epoch=0)
    got = load_resharded(tmp_path, 2, 1, [4, 8], job_hash=JOB_HASH)
    assert torch.equal(got["u0.param"], torch.tensor([2.0, 3.0]))
    assert torch.equal(got["u1.param"], torch.tensor([8.0, 9.0, 10.0, 11.0]))


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    from worker.zero3 import checkpoint as ck

    directory, step, crash_rank, crash_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    real_replace = os.replace

    def crashing_replace(src, dst):
        if Path(dst).name.endswith(crash_at) and f"rank-{crash_rank:05d}-" in Path(dst).name:
            os._exit(17)  # die between the tmp write (already fsynced) and the rename
        real_replace(src, dst)

    os.replace = crashing_replace
    for rank in range(2):
        tensors = {"u0.param": torch.full((3,), float(step + rank)), "step": torch.tensor(step)}
        ck.save_shards(directory, step, rank, 2, "JOB_HASH", [5], tensors, {}, epoch=1)
    """
).replace("JOB_HASH", JOB_HASH)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crash_at", [".safetensors", ".json"])
def test_crash_between_tmp_write_and_rename_keeps_previous_latest(
    tmp_path: Path, reaper: ProcessReaper, crash_at: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(step: int, crash_rank: int) -> int:
        proc = reaper.spawn(
            [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), str(step), str(crash_rank), crash_at],
            cwd=REPO,
            env=env,
        )
        return proc.wait(timeout=50)

    for rank in range(2):  # the previous checkpoint, written in-process exactly as the script does
        tensors = {"u0.param": torch.full((3,), float(100 + rank)), "step": torch.tensor(100)}
        save_shards(tmp_path, 100, rank, 2, JOB_HASH, [5], tensors, {}, epoch=1)
    assert run(200, crash_rank=1) == 17
    leftovers = [p.name for p in step_dir(tmp_path, 200).iterdir() if ".tmp-" in p.name]
    assert leftovers, "the crash should have left a temporary file behind"
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and info.step == 100
    got = load_resharded(tmp_path, 1, 0, [5], job_hash=JOB_HASH)
    assert torch.equal(got["u0.param"], torch.tensor([100.0, 100.0, 100.0, 101.0, 101.0]))
    assert int(got["step"]) == 100


def test_prune_keeps_newest_complete_and_newer_incomplete(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        save_all(tmp_path, step, 2)
    full = full_tensors(0)
    (step_dir(tmp_path, 40) / "rank-00001-of-00002.json").unlink()  # a crashed save between complete ones
    save_shards(
        tmp_path, 60, 0, 2, JOB_HASH, UNIT_NUMELS, rank_tensors(full, 2, 0), {}, epoch=EPOCH
    )  # in progress
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-000010", "step-000020", "step-000040"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000030", "step-000050", "step-000060"]
    info = latest_complete(tmp_path)
    assert info is not None and info.step == 50
    assert prune(tmp_path, keep=2) == []
    with pytest.raises(ValueError):
        prune(tmp_path, keep=0)
    assert prune(tmp_path / "absent") == [] and latest_complete(tmp_path / "absent") is None


def test_complete_world_size_is_found_beside_an_incomplete_one(tmp_path: Path) -> None:
    full = full_tensors(3)
    save_shards(
        tmp_path, 10, 0, 3, JOB_HASH, UNIT_NUMELS, rank_tensors(full, 3, 0), {}, epoch=2
    )  # 1 of 3 parts
    save_all(tmp_path, 10, 2, seed=3)
    info = latest_complete(tmp_path, JOB_HASH)
    assert info is not None and (info.step, info.world_size) == (10, 2)
    got = reassemble([load_resharded(step_dir(tmp_path, 10), 1, 0, UNIT_NUMELS, job_hash=JOB_HASH)], 1)
    assert all(torch.equal(got[n][k], full[n][k]) for n in STATE_NAMES for k in range(len(UNIT_NUMELS)))


def test_resume_optimizer_from_checkpoint_at_another_world_size_is_bit_exact(tmp_path: Path) -> None:
    """ShardedOptimizer at world 3 -> checkpoint -> world 2 continues exactly like an uninterrupted run."""
    job = ref.make_job(**ref.CONFIGS["adamw"])
    want = ref.run_reference(job, seed=6, steps=ref.STEPS)
    numels = [sum(math.prod(s) for s in unit) for unit in ref.UNITS]
    old = ref.ShardedRun(job, seed=6, world=3)
    for step in range(3):
        old.step(step)
    for r in range(3):
        tensors = {f"u{k}.param": s for k, s in enumerate(old.shards[r])}
        tensors.update(old.opts[r].state_tensors())
        save_shards(tmp_path, 3, r, 3, job.hash, numels, tensors, {"next_step": 3}, epoch=EPOCH)
    info = latest_complete(tmp_path, job.hash)
    assert info is not None and info.extra["next_step"] == 3
    new = ref.ShardedRun(job, seed=6, world=2)
    for r in range(2):
        for s in new.shards[r]:
            s.zero_()  # everything must come from the checkpoint
        loaded = load_resharded(info, 2, r, numels, job_hash=job.hash)
        for k in range(len(numels)):
            new.shards[r][k].copy_(loaded.pop(f"u{k}.param"))
        new.opts[r].load_state_tensors(loaded)
    for step in range(3, ref.STEPS):
        new.step(step)
    ref.assert_bit_identical(new, want)
