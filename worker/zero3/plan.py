"""The ZeRO-3 partition plan: which parameters form which unit, and how each unit is split by rank.

A unit's parameters are flattened in a fixed order into one buffer of ``numel`` elements, padded at the tail
to ``padded_numel`` (the next multiple of the world size), and rank ``r`` owns elements
``[r * shard_numel, (r + 1) * shard_numel)``. The plan is pure data: :func:`build_plan` maps names and shapes
to offsets with no torch state, and :func:`plan_model` only reads a module's structure.

Unit selection (:func:`select_units`): a model that declares its units (the :class:`DeclaresUnits` hook,
``zerowire_units()``: the models of ``worker.models`` return ``[stem, *blocks, head]``) gets those; for any
other module, children holding at least ``min_unit_numel`` parameters become units,
containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) above the threshold are recursed into,
and every parameter left outside a unit goes to a final *root* unit (module name ``""``), which stays gathered
from the start of the forward pass to the end of the backward pass. A caller may instead hand the engine a
function that names a model's units (:data:`UnitsOf`, see :func:`unit_names`): the workers hand it
``worker.models.units``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

DEFAULT_MIN_UNIT_NUMEL = 100_000


def shard_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's shard in the padded flat buffer of a unit of ``numel`` elements: every
    rank holds ``ceil(numel / world_size)`` of them, the last one the padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    size = -(-numel // world_size)
    return rank * size, (rank + 1) * size


@dataclass(frozen=True, slots=True)
class ParamSlot:
    """One parameter's place in its unit's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """One unit: its module (qualified name; ``""`` for the root unit), parameters and sharding."""

    index: int
    module: str
    params: tuple[ParamSlot, ...]
    numel: int
    padded_numel: int
    world_size: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    @property
    def is_root(self) -> bool:
        return self.module == ""

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of rank's shard in the padded flat buffer."""
        return shard_range(self.numel, self.world_size, rank)


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    world_size: int
    units: tuple[UnitPlan, ...]

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def padded_numel(self) -> int:
        return sum(u.padded_numel for u in self.units)

    @property
    def shard_numel(self) -> int:
        """Elements of every unit's shard held by one rank."""
        return sum(u.shard_numel for u in self.units)

    @property
    def max_unit_numel(self) -> int:
        return max((u.padded_numel for u in self.units), default=0)

    def param_names(self) -> list[str]:
        return [p.name for u in self.units for p in u.params]

    def describe(self) -> str:
        return (
            f"{len(self.units)} units, {self.numel} params ({self.padded_numel} padded), "
            f"{self.shard_numel} per rank of {self.world_size}"
        )


def build_plan(
    units: Sequence[tuple[str, Sequence[tuple[str, tuple[int, ...]]]]], world_size: int
) -> PartitionPlan:
    """Plan from ``[(module_name, [(param_name, shape), ...]), ...]`` in unit order (params in flat order).

    Units without parameters are dropped. Raises ``ValueError`` on a bad world size, a duplicate parameter
    name, a duplicate module name or a negative dimension.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    seen_params: set[str] = set()
    seen_modules: set[str] = set()
    out: list[UnitPlan] = []
    for module, params in units:
        if module in seen_modules:
            raise ValueError(f"module {module!r} appears in two units")
        seen_modules.add(module)
        slots: list[ParamSlot] = []
        offset = 0
        for name, shape in params:
            if name in seen_params:
                raise ValueError(f"parameter {name!r} appears twice in the plan")
            if any(d < 0 for d in shape):
                raise ValueError(f"parameter {name!r} has a negative dimension: {shape}")
            seen_params.add(name)
            slot = ParamSlot(name, tuple(int(d) for d in shape), offset)
            slots.append(slot)
            offset += slot.numel
        if offset == 0:
            continue
        padded = -(-offset // world_size) * world_size
        out.append(UnitPlan(len(out), module, tuple(slots), offset, padded, world_size))
    return PartitionPlan(world_size, tuple(out))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@runtime_checkable
class DeclaresUnits(Protocol):
    """The hook by which a model names its own ZeRO-3 units: submodules, in forward order."""

    def zerowire_units(self) -> Sequence[nn.Module]: ...


UnitsOf = Callable[[nn.Module], Sequence[nn.Module]]  # a model's unit modules, in forward order


def unit_names(model: nn.Module, units: UnitsOf) -> list[str]:
    """Qualified names of the modules ``units(model)`` returns (ValueError for one outside the model)."""
    names = {id(m): n for n, m in model.named_modules()}
    chosen = list(units(model))
    unknown = [type(m).__name__ for m in chosen if id(m) not in names]
    if unknown:
        raise ValueError(f"the units of {type(model).__name__} name modules outside it: {unknown}")
    return [names[id(m)] for m in chosen]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def select_units(model: nn.Module, min_unit_numel: int = DEFAULT_MIN_UNIT_NUMEL) -> list[str]:
    """Qualified names of the unit modules of ``model``, in registration order (see module docstring)."""
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(model, DeclaresUnits):
        declared = list(model.zerowire_units())
        unknown = [type(m).__name__ for m in declared if id(m) not in names]
        if unknown:
            raise ValueError(
                f"zerowire_units() of {type(model).__name__} names modules outside it: {unknown}"
            )
        return [names[id(m)] for m in declared]
    chosen: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}{name}"
            n = _count(child)
            if n == 0:
                continue
            if isinstance(child, _CONTAINERS) and n >= min_unit_numel:
                visit(child, f"{qual}.")
            elif n >= min_unit_numel:
                chosen.append(qual)

    visit(model, "")
    return chosen


def plan_model(
    model: nn.Module,
    world_size: int,
    unit_modules: Sequence[str] | None = None,
    min_unit_numel: int = DEFAULT_MIN_UNIT_NUMEL,
) -> PartitionPlan:
    """The plan of ``model``: one unit per name in ``unit_modules`` (default :func:`select_units`), in that
    order, then a root unit with every parameter outside them. Parameters keep ``named_parameters`` order.

    Raises ``ValueError`` for nested or unknown unit modules, parameters shared between units, and frozen
    parameters (every parameter must require a gradient).
    """
    modules = dict(model.named_modules())
    names = list(select_units(model, min_unit_numel) if unit_modules is None else unit_modules)
    for n in names:
        if n not in modules or n == "":
            raise ValueError(f"unit module {n!r} is not a proper submodule of {type(model).__name__}")
    for a in names:
        for b in names:
            if a != b and b.startswith(f"{a}."):
                raise ValueError(f"unit modules {a!r} and {b!r} are nested")
    owner: dict[int, str] = {}
    specs: list[tuple[str, list[tuple[str, tuple[int, ...]]]]] = []
    for n in names:
        params: list[tuple[str, tuple[int, ...]]] = []
        for pname, p in modules[n].named_parameters():
            if id(p) in owner:
                raise ValueError(f"parameter {n}.{pname} is shared with unit {owner[id(p)]!r}")
            owner[id(p)] = n
            params.append((f"{n}.{pname}", tuple(p.shape)))
        specs.append((n, params))
    root: list[tuple[str, tuple[int, ...]]] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            raise ValueError(f"parameter {pname} is frozen; ZeRO-3 units need every parameter trainable")
        if id(p) not in owner:
            root.append((pname, tuple(p.shape)))
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner and not pname.startswith(f"{owner[id(p)]}."):
            raise ValueError(f"parameter {pname} of unit {owner[id(p)]!r} is also reachable outside it")
    specs.append(("", root))
    return build_plan(specs, world_size)
