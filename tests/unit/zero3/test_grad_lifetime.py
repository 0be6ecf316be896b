"""How long the engine holds gradient memory: a unit's gradient shard exists from its reduction until the
next pass, and a pass holds only the shards of the units reduced so far."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from communication.group import PeerGroup
from communication.testing import FakeHub
from tests.unit.zero3.fixtures import UNITS, TinyNet, batch_indices, make_data, rank_slices, run_ranks
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)

WORLD = 2
BATCH = 12
STEPS = 2


def test_gradient_shards_live_from_their_reduction_to_the_next_pass() -> None:
    torch.set_num_threads(1)
    x, y = make_data()

    def body(rank: int, hub: FakeHub, group: PeerGroup) -> dict[str, list[int]]:
        backend = hub.backend(rank)
        torch.manual_seed(0)
        model = TinyNet()
        engine = ShardedModule(model, group, backend, plan=plan_model(model, WORLD, UNITS), timeout=20.0)
        held_at_reduce: list[int] = []
        inner = backend.reduce_scatter

        def spy(
            g: PeerGroup,
            step: int,
            unit: int,
            full: torch.Tensor,
            out: torch.Tensor,
            timeout: float,
            **options: Any,
        ) -> Future[torch.Tensor]:
            held_at_reduce.append(sum(u.grad_shard.numel() > 0 for u in engine.units))
            return inner(g, step, unit, full, out, timeout, **options)

        backend.reduce_scatter = spy  # type: ignore[method-assign]
        after_begin: list[int] = []
        after_finish: list[int] = []
        sl = rank_slices(BATCH, WORLD)[rank]
        for step in range(STEPS):
            idx = batch_indices(step, x.shape[0], BATCH)[sl]
            engine.begin(step)
            after_begin.append(sum(s.numel() for s in engine.grad_shards))
            F.cross_entropy(engine(x[idx]), y[idx], reduction="sum").backward()
            engine.finish_backward()
            after_finish.append(sum(s.numel() for s in engine.grad_shards))
            backend.release(group, step)
        backend.close()
        shard_numels = [u.plan.shard_numel for u in engine.units]
        return {"begin": after_begin, "finish": after_finish, "held": held_at_reduce, "numels": shard_numels}

    for got in run_ranks(WORLD, body):
        units = len(got["numels"])
        assert got["begin"] == [0] * STEPS  # nothing held before the first reduction of a pass
        assert got["finish"] == [sum(got["numels"])] * STEPS
        # the k-th reduction of a pass finds exactly k gradient shards: its own target and the k - 1 before it
        assert got["held"] == list(range(1, units + 1)) * STEPS
