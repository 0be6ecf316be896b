"""`zerowire run --replay`: bad input gets a clear error and writes nothing; the notes that say when the
replay cannot be bit-identical to the run. (The replay itself: tests/integration/test_replay.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from jobspec import JobSpec
from zerowire.cli import main
from zerowire.commands.replay import exactness_notes

pytestmark = pytest.mark.timeout(60)

JOB = JobSpec(steps=4, warmup_steps=0, global_batch=16)


def summary(**changes: Any) -> dict[str, Any]:
    """A replayable summary with ``changes`` applied (a value of ``...`` drops the key)."""
    base: dict[str, Any] = {
        "job": JOB.model_dump(mode="json"),
        "job_hash": JOB.hash,
        "world_sizes": [2, 2, 1, 1],
        "skipped_steps": [],
        "threads": 1,
        "workers": 2,
        "hosts": 2,
        "device": "cpu",
        "model": None,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def replay(tmp_path: Path, data: dict[str, Any] | str, *args: str) -> tuple[int, str, Path]:
    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    out = tmp_path / "replay"
    rc = main(["run", "--replay", str(path), "--output", str(out), *args])
    return rc, str(path), out


@pytest.mark.parametrize(
    ("data", "args", "message"),
    [
        (summary(), ("--workers", "2"), "--workers must be 1, not 2"),
        (summary(), ("--workers", "1", "--hosts", "2"), "--hosts has no meaning with --replay"),
        (summary(), ("--model", "resnet20"), "takes the job from .*; drop --model"),
        ("{not json", (), "cannot read the summary"),
        ("[1, 2]", (), "is not a run summary"),
        (summary(world_sizes=...), (), "records no world_sizes"),
        (summary(world_sizes=[2, None, 1]), (), r"no record of steps \[1\]"),
        (summary(world_sizes=[2, 0]), (), "world size of step 1"),
        (summary(world_sizes=[2] * 5), (), "the job only 4"),
        (summary(skipped_steps=[7]), (), "skipped steps"),
        (summary(job_hash="0" * 64), (), "differs from the hash"),
        (summary(job={"steps": -1}), (), "invalid job"),
        (summary(threads=...), (), "pass --threads"),
        (summary(), ("--device", "tpu"), "--device must be cpu, cuda or cuda:i"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Any, args: tuple[str, ...], message: str
) -> None:
    rc, _, out = replay(tmp_path, data, *args)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("zerowire run: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_the_run_s_own_model_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, copy_dir = tmp_path / "run", tmp_path / "copy"
    for folder in (run_dir, copy_dir):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"the run's model")
    path = copy_dir / "summary.json"  # a copy of the run's summary, next to a copy of its model
    path.write_text(json.dumps(summary(model=str(run_dir / "model.safetensors"))))
    for out in (str(run_dir), f"{copy_dir}/../copy"):
        assert main(["run", "--replay", str(path), "--workers", "1", "--output", out]) == 2
        assert "holds the run's own model" in capsys.readouterr().err
    for folder in (run_dir, copy_dir):
        assert (folder / "model.safetensors").read_bytes() == b"the run's model"
        assert not (folder / "replay.json").exists()


def test_notes_say_when_the_replay_cannot_be_bit_identical() -> None:
    flat = summary()
    assert exactness_notes(flat, JOB, 1, "cpu") == []
    assert exactness_notes(summary(workers=3, hosts=1), JOB, 1, "cpu") == []  # one host: rank order
    assert exactness_notes(summary(workers=3, hosts=2), JOB, 1, "cpu") == []  # uneven hosts: flat
    assert exactness_notes(summary(workers=..., hosts=...), JOB, 1, "cpu") == []
    (hier,) = exactness_notes(summary(workers=4, hosts=2), JOB, 1, "cpu")
    assert "hierarchical" in hier
    (int8,) = exactness_notes(flat, JOB.model_copy(update={"compression": "int8"}), 1, "cpu")
    assert "int8" in int8
    (threads,) = exactness_notes(flat, JOB, 2, "cpu")
    assert "1 torch threads, the replay 2" in threads
    (device,) = exactness_notes(summary(device="cuda"), JOB, 1, "cpu")
    assert "cuda" in device
