"""The Trainer over the in-process fake backend: bit-exact vs the plain loop, resume at another world size,
identical evaluation on every rank, the saved model loads into the plain class."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import assert_bit_identical, run_ranks
from tests.unit.zero3.reference import plain_reference
from worker.models import build_model
from worker.trainer import EvalReport, Trainer, TrainOutcome

pytestmark = pytest.mark.timeout(90)


JOB = JobSpec.model_validate(
    dict(
        job_id="job",
        steps=8,
        global_batch=32,
        lr=0.1,
        momentum=0.9,
        schedule="cosine",
        warmup_steps=2,
        eval_every=4,
    )
)


@pytest.mark.parametrize("world", [2, 3])
def test_trainer_bit_identical_and_same_eval(world: int, tmp_path: Path) -> None:
    def body(rank: int, hub: FakeHub, group: PeerGroup) -> tuple[TrainOutcome, list[EvalReport]]:
        trainer = Trainer(JOB, group, hub.backend(rank), device=torch.device("cpu"))
        evals: list[EvalReport] = []
        outcome = trainer.run(on_eval=evals.append)
        trainer.save_model(tmp_path / "model.safetensors")
        return outcome, evals

    results = run_ranks(world, body)
    outcomes = [r[0] for r in results]
    assert all(o.steps_done == JOB.steps for o in outcomes)
    assert len({(o.final_loss, o.test_accuracy, o.test_loss) for o in outcomes}) == 1
    assert [len(r[1]) for r in results] == [2] * world and len({tuple(r[1]) for r in results}) == 1
    assert outcomes[0].test_accuracy is not None and 0.0 <= outcomes[0].test_accuracy <= 1.0
    saved = load_file(str(tmp_path / "model.safetensors"))
    model = build_model("resnet8", 10, 1)
    model.load_state_dict(saved)  # strict: every parameter and buffer, plain names
    params = {n: saved[n] for n, _ in model.named_parameters()}
    assert_bit_identical(params, plain_reference(JOB, lambda s: world))


def test_resume_at_another_world_size_is_bit_exact(tmp_path: Path) -> None:
    job = JOB.model_copy(update={"checkpoint_every": 3, "eval_every": 0})
    ckpt = tmp_path / "ckpt"

    def first(rank: int, hub: FakeHub, group: PeerGroup) -> TrainOutcome:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"), checkpoint_dir=ckpt)
        return trainer.run(should_stop=lambda: trainer.steps_done >= 5)

    outcomes = run_ranks(2, first)
    assert all(o.stopped_early and o.steps_done == 5 for o in outcomes)

    def second(rank: int, hub: FakeHub, group: PeerGroup) -> dict[str, torch.Tensor]:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"), checkpoint_dir=ckpt)
        assert trainer.resumed_from == 3
        out = trainer.run()
        assert out.steps_done == job.steps and out.resumed_from == 3
        trainer.save_model(tmp_path / "model.safetensors")
        return {}

    run_ranks(3, second)
    saved = load_file(str(tmp_path / "model.safetensors"))
    ref = plain_reference(job, lambda s: 2 if s < 3 else 3)
    assert_bit_identical({n: saved[n] for n in ref}, ref)


def test_rejects_batch_smaller_than_world() -> None:
    job = JOB.model_copy(update={"global_batch": 2})
    hub = FakeHub(3)
    group = PeerGroup("job", 0, 0, ("a:1", "a:2", "a:3"))
    with pytest.raises(ValueError, match="smaller than the world size"):
        Trainer(job, group, hub.backend(0), device=torch.device("cpu"))


def test_dead_peer_fails_the_step_without_applying_it() -> None:
    from communication.errors import PeerLost
    from communication.testing import FaultInjector

    hub = FakeHub(2, faults=FaultInjector(dead_at={1: 3}))
    job = JOB.model_copy(update={"eval_every": 0})
    results: list[Any] = [None, None]
    shards_before: list[list[torch.Tensor]] = [[], []]

    def target(rank: int) -> None:
        group = PeerGroup("job", 0, rank, ("127.0.0.1:1", "127.0.0.1:2"))
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"), collective_timeout=10.0)

        def on_step(report: Any) -> None:
            shards_before[rank] = [s.clone() for s in trainer.engine.shards]

        try:
            trainer.run(on_step=on_step)
        except BaseException as exc:
            results[rank] = (exc, trainer.steps_done, [s.clone() for s in trainer.engine.shards])

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for rank in range(2):
        exc, done, shards = results[rank]
        assert isinstance(exc, PeerLost), repr(exc)
        assert done == 3
        assert all(torch.equal(a, b) for a, b in zip(shards, shards_before[rank], strict=True))
