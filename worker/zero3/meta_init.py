"""Seeded initialisation without building the model: record the construction on the meta device, then replay
its tensor operations on CPU one tensor at a time, keeping only the slices the caller asks for.

An eager ``build()`` draws every random value from torch's CPU generator in the order its operations run
(``reset_parameters`` of each submodule as it is constructed, then any custom init loop). :func:`trace_build`
runs ``build()`` under ``torch.device("meta")`` with a dispatch mode that records every operation touching a
meta tensor (factories, in-place fills and random draws, functional ops), in order; meta kernels draw nothing.
:func:`replay` then runs the same operations on real CPU tensors, in the same order, from the same generator
state, so every random operation sees exactly the generator state and tensor shape it saw eagerly: values
are bit-identical to the eager build, and the generator ends in the same state.

Memory: a tensor's value is held only while it is live. View operations are not run (a view is resolved
against its storage when used); after each operation a storage whose next use overwrites it whole (a fill,
a random draw, ``copy_``) is dropped, and a storage with no further use hands its final value to the sink
and is dropped. Every conv weight of a ResNet is drawn twice (``reset_parameters``, then the He re-init)
and its first value is dead, so replay holds about one parameter at a time, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_aten = torch.ops.aten
# In-place operations whose result does not depend on the target's previous value.
_OVERWRITES = {
    _aten.uniform_,
    _aten.normal_,
    _aten.fill_,
    _aten.zero_,
    _aten.random_,
    _aten.bernoulli_,
    _aten.exponential_,
    _aten.geometric_,
    _aten.log_normal_,
    _aten.cauchy_,
    _aten.copy_,
}
_META = torch.device("meta")
_CPU = torch.device("cpu")


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views and the parameter wrapping a tensor share it)."""
    return int(t.untyped_storage()._cdata)


@dataclass
class _Op:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    reads: set[int] = field(default_factory=set)  # storages whose value the op uses
    kills: set[int] = field(default_factory=set)  # storages the op overwrites whole
    defines: set[int] = field(default_factory=set)  # storages the op creates


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device == _META for t in tensors_in + tensors_out) and not func.is_view:
            self.ops.append(_Op(func, args, kwargs, [t for t in tensors_out if t.device == _META]))
        return out


def _covers_storage(t: torch.Tensor) -> bool:
    return (
        t.storage_offset() == 0
        and t.is_contiguous()
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def _analyse(ops: list[_Op]) -> None:
    """Fill each op's reads / kills / defines."""
    for op in ops:
        written: set[int] = set()
        for i, arg in enumerate(op.func._schema.arguments):
            info = arg.alias_info
            value = op.args[i] if i < len(op.args) else op.kwargs.get(arg.name)
            if info is not None and info.is_write and isinstance(value, torch.Tensor):
                key = storage_key(value)
                written.add(key)
                if op.func.overloadpacket in _OVERWRITES and _covers_storage(value):
                    op.kills.add(key)
                else:
                    op.reads.add(key)
        for t in tree_flatten((op.args, op.kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device == _META and storage_key(t) not in written:
                op.reads.add(storage_key(t))
        for t in op.outputs:
            key = storage_key(t)
            if key not in written and key not in op.reads:
                op.defines.add(key)


@dataclass
class Trace:
    """A model built on the meta device and the operations its construction ran, in order."""

    model: nn.Module
    ops: list[_Op]
    rng_state: torch.Tensor  # the CPU generator state the construction started from


def trace_build(build: Callable[[], nn.Module]) -> Trace:
    """Run ``build()`` on the meta device, recording its tensor operations (nothing is drawn from the RNG)."""
    rng_state = torch.get_rng_state()
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = build()
    if not torch.equal(torch.get_rng_state(), rng_state):
        raise RuntimeError(
            "the model builder drew from the CPU generator outside meta tensors; cannot replay"
        )
    _analyse(recorder.ops)
    return Trace(model, recorder.ops, rng_state)


Sink = Callable[[int, torch.Tensor], None]  # (storage key, the storage's final value as a flat CPU tensor)


def _to_cpu_device(x: Any) -> Any:
    return _CPU if isinstance(x, torch.device) and x == _META else x


class _Storages:
    """CPU values of the live meta storages, each a flat tensor over the whole storage."""

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.peak_bytes = 0

    def view(self, t: torch.Tensor, *, allocate: bool) -> torch.Tensor:
        key = storage_key(t)
        flat = self.values.get(key)
        if flat is None:
            if not allocate:
                raise RuntimeError("replay reads a meta tensor whose value was never recorded")
            flat = self._set(
                key, torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
            )
        if flat.dtype != t.dtype:
            flat = flat.view(t.dtype)
        return flat.as_strided(t.size(), t.stride(), t.storage_offset())

    def define(self, meta: torch.Tensor, cpu: torch.Tensor) -> None:
        n = meta.untyped_storage().nbytes() // meta.element_size()
        flat = torch.empty(0, dtype=cpu.dtype).set_(cpu.untyped_storage(), 0, (n,), (1,))
        self._set(storage_key(meta), flat)

    def _set(self, key: int, flat: torch.Tensor) -> torch.Tensor:
        self.values[key] = flat
        self.bytes += flat.numel() * flat.element_size()
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return flat

    def drop(self, key: int) -> torch.Tensor | None:
        flat = self.values.pop(key, None)
        if flat is not None:
            self.bytes -= flat.numel() * flat.element_size()
        return flat


def _run(op: _Op, store: _Storages) -> None:
    """Run one recorded operation on CPU; a storage it creates joins the store (its only reference once
    this returns, so dropping it frees it)."""

    def to_cpu(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.device == _META:
            return store.view(x, allocate=storage_key(x) in op.kills)
        return _to_cpu_device(x)

    out = op.func(*tree_map(to_cpu, op.args), **tree_map(to_cpu, op.kwargs))
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    for meta, cpu in zip(op.outputs, outs, strict=False):
        if storage_key(meta) in op.defines:
            store.define(meta, cpu)


def replay(trace: Trace, wanted: dict[int, str], sink: Sink) -> int:
    """Run the recorded operations on CPU from the recorded generator state; hand each storage in
    ``wanted`` (storage key -> a name for errors) to ``sink`` once its value is final. Returns the peak
    bytes of values held at once.

    Raises ``RuntimeError`` when a wanted storage was never produced by a recorded operation.
    """
    ops = trace.ops
    # per op: storage -> whether its next use overwrites it whole (absent: no later use)
    next_kills: list[dict[int, bool]] = [{} for _ in ops]
    upcoming: dict[int, bool] = {}
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        for key in op.reads | op.kills | op.defines:
            if key in upcoming:
                next_kills[i][key] = upcoming[key]
            upcoming[key] = key in op.kills and key not in op.reads
    last = {key: i for i, op in enumerate(ops) for key in op.reads | op.kills | op.defines}
    missing = sorted(name for key, name in wanted.items() if key not in last)
    if missing:
        raise RuntimeError(f"{missing[:5]} never initialised by a recorded operation; no replay")
    store = _Storages()
    saved = torch.get_rng_state()
    torch.set_rng_state(trace.rng_state)
    try:
        for i, op in enumerate(ops):
            _run(op, store)
            for key in op.reads | op.kills | op.defines:
                if last[key] == i:
                    flat = store.drop(key)
                    if key in wanted and flat is not None:
                        sink(key, flat)
                    del flat
                elif next_kills[i][key]:
                    store.drop(key)  # the next use overwrites it whole
    except BaseException:
        torch.set_rng_state(saved)
        raise
    return store.peak_bytes
