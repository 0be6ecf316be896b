"""The partition plan: pure offsets and shard ranges, unit selection on real and generic models."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.unit.zero3.fixtures import UNITS, TinyNet
from worker.models import build_model
from worker.zero3.plan import build_plan, plan_model, select_units

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
units = st.lists(st.lists(shapes, min_size=0, max_size=5), min_size=0, max_size=6)


@settings(max_examples=100, deadline=None)
@given(units=units, world=st.integers(1, 9))
def test_offsets_cover_without_overlap_and_shards_tile(
    units: list[list[tuple[int, ...]]], world: int
) -> None:
    spec = [(f"m{i}", [(f"m{i}.p{j}", s) for j, s in enumerate(u)]) for i, u in enumerate(units)]
    plan = build_plan(spec, world)
    nonempty = [u for u in spec if sum(math.prod(s) for _, s in u[1]) > 0]
    assert [u.module for u in plan.units] == [m for m, _ in nonempty]
    for k, unit in enumerate(plan.units):
        assert unit.index == k
        pos = 0
        for slot in unit.params:  # params laid end to end in the given order: no gap, no overlap
            assert slot.offset == pos
            pos += slot.numel
        assert pos == unit.numel > 0
        assert unit.padded_numel % world == 0 and 0 <= unit.padding < world
        ranges = [unit.shard_range(r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == unit.padded_numel
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(stop - start == unit.shard_numel for start, stop in ranges)
    assert plan.shard_numel * world == plan.padded_numel
    assert plan.numel == sum(math.prod(s) for u in units for s in u)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="world_size"):
        build_plan([], 0)
    with pytest.raises(ValueError, match="twice"):
        build_plan([("a", [("x", (2,))]), ("b", [("x", (3,))])], 2)
    with pytest.raises(ValueError, match="two units"):
        build_plan([("a", [("x", (2,))]), ("a", [("y", (3,))])], 2)
    with pytest.raises(ValueError, match="negative"):
        build_plan([("a", [("x", (-1,))])], 2)
    with pytest.raises(ValueError, match="outside"):
        build_plan([("a", [("x", (5,))])], 2).units[0].shard_range(2)


def test_resnet_units_are_stem_blocks_head() -> None:
    model = build_model("resnet18", 10, 3)
    plan = plan_model(model, 4)
    assert [u.module for u in plan.units] == ["stem", *[f"blocks.{i}" for i in range(8)], "head"]
    assert plan.numel == 11_173_962
    assert sorted(plan.param_names()) == sorted(n for n, _ in model.named_parameters())


def test_generic_selection_recurses_into_containers_and_builds_a_root_unit() -> None:
    model = TinyNet()
    names = select_units(model, min_unit_numel=300)
    assert names == ["blocks.0", "blocks.1"]  # the small stem (66), head (35) and `scale` stay outside
    plan = plan_model(model, 3, min_unit_numel=300)
    root = plan.units[-1]
    assert root.is_root and sorted(p.name for p in root.params) == sorted(
        ["scale", "stem.0.weight", "stem.1.weight", "stem.1.bias", "head.weight", "head.bias"]
    )
    explicit = plan_model(model, 3, UNITS)
    assert [u.module for u in explicit.units] == [*UNITS, ""]


def test_plan_model_rejects_nested_shared_and_frozen() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match="nested"):
        plan_model(model, 2, ["blocks.0", "blocks.0.conv1"])
    with pytest.raises(ValueError, match="not a proper submodule"):
        plan_model(model, 2, ["nope"])
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match="shared"):
        plan_model(shared, 2, ["0", "1"])
    frozen = TinyNet()
    frozen.scale.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        plan_model(frozen, 2, UNITS)


class _Declared(nn.Module):
    """A user model that names its own units through the engine's hook."""

    def __init__(self, outside: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)
        self._outside = [outside] if outside is not None else []

    def zerowire_units(self) -> list[nn.Module]:
        return [self.c, self.a, *self._outside]


def test_a_model_names_its_units_through_the_hook() -> None:
    # Any model, not only the zoo's: the declared order wins over the size threshold and registration order.
    assert select_units(_Declared(), min_unit_numel=10**9) == ["c", "a"]
    plan = plan_model(_Declared(), 2)
    assert [u.module for u in plan.units] == ["c", "a", ""]
    assert sorted(p.name for p in plan.units[-1].params) == ["b.bias", "b.weight"]
    with pytest.raises(ValueError, match="names modules outside it"):
        select_units(_Declared(outside=nn.Linear(2, 2)))
