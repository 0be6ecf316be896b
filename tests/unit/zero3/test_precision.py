"""Mixed precision (the job's ``param_dtype``) in the sharded engine, over the in-process fake backend.

A bf16/fp16 engine is bit-identical to a plain PyTorch loop that follows the same policy by hand (fp32
master, parameters cast per micro-batch except normalization layers', fp32 loss, each micro-batch's gradient
converted to fp32 and summed in rank order). Gathered parameters really are in the compute dtype, the
normalization layers' stay fp32, and the state read back is the fp32 master.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from jobspec import JobSpec
from tests.unit.zero3.fixtures import (
    UNITS,
    TinyNet,
    assert_bit_identical,
    make_data,
    mixed_reference_run,
    reference_run,
    sharded_run,
    small_job,
)
from worker.zero3 import precision
from worker.zero3.flat_unit import FlatUnit
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)


def _job(**kw: object) -> JobSpec:
    return small_job(**{"steps": 5, **kw})


@pytest.mark.parametrize(("world", "dtype"), [(1, torch.bfloat16), (2, torch.bfloat16), (2, torch.float16)])
def test_mixed_engine_bit_identical_to_plain_mixed_loop(world: int, dtype: torch.dtype) -> None:
    job = _job()
    data = make_data()
    ref = mixed_reference_run(TinyNet, job, world, data, dtype)
    for got in sharded_run(TinyNet, job, world, data, units=UNITS, param_dtype=dtype):
        assert all(t.dtype == torch.float32 for t in got.values())  # the master values, not the casts
        assert_bit_identical(got, ref)


def test_mixed_differs_from_fp32_and_stays_close() -> None:
    """The compute dtype was really used (results differ from fp32), and only by rounding."""
    job = _job(steps=3)
    data = make_data()
    fp32 = reference_run(TinyNet, job, 2, data)
    got = sharded_run(TinyNet, job, 2, data, units=UNITS, param_dtype=torch.bfloat16)[0]
    diffs = {n: float((got[n] - fp32[n]).abs().max()) for n in fp32}
    assert max(diffs.values()) > 0, "bf16 run is identical to fp32: nothing was cast"
    # 3 steps of lr <= 0.05 on O(1) weights: bf16 (8 bits of mantissa) moves them by far less than 0.05
    assert max(diffs.values()) < 0.05, diffs


def test_gathered_parameters_and_gradients_dtypes() -> None:
    """While gathered, conv/linear parameters are bf16 and BatchNorm's fp32; the unit's bf16 gradient is
    moved into one flat buffer as each parameter's is accumulated, and reduced into fp32 shards."""
    job = _job(steps=2)
    data = make_data()
    seen: dict[str, object] = {}
    params: dict[str, torch.dtype] = {}

    def probe(rank: int, engine: ShardedModule) -> None:
        seen[f"grad_dtypes{rank}"] = {g.dtype for g in engine.grad_shards}
        seen[f"shard_dtypes{rank}"] = {s.dtype for s in engine.shards}

    def spy(unit: FlatUnit) -> None:
        dtypes = {s.name: p.dtype for s, p in zip(unit.plan.params, unit.params, strict=True)}
        flat = unit._grad_flat
        assert flat is not None and flat.dtype == torch.bfloat16
        for i, p in enumerate(unit.params):  # bf16 gradients moved into the flat buffer, fp32 ones kept
            if p.dtype == torch.bfloat16:
                assert p.grad is None and unit._grad_in_flat[i]
            else:  # BatchNorm's: the parameter's own fp32 gradient until flat_grad converts it
                assert p.grad is not None and p.grad.dtype == torch.float32 and not unit._grad_in_flat[i]
        params.update(dtypes)

    original = FlatUnit.flat_grad

    def flat_grad(self: FlatUnit) -> torch.Tensor:
        spy(self)
        out = original(self)
        assert out.dtype == torch.float32 and out.numel() == self.plan.padded_numel
        return out

    FlatUnit.flat_grad = flat_grad  # type: ignore[method-assign]
    try:
        sharded_run(TinyNet, job, 2, data, units=UNITS, probe=probe, param_dtype=torch.bfloat16)
    finally:
        FlatUnit.flat_grad = original  # type: ignore[method-assign]
    assert params["stem.0.weight"] == torch.bfloat16 and params["head.weight"] == torch.bfloat16
    assert params["scale"] == torch.bfloat16
    assert params["stem.1.weight"] == torch.float32 and params["blocks.0.bn2.bias"] == torch.float32
    for rank in (0, 1):
        assert seen[f"grad_dtypes{rank}"] == {torch.float32}
        assert seen[f"shard_dtypes{rank}"] == {torch.float32}


def test_running_statistics_stay_fp32_and_move() -> None:
    job = _job(steps=2)
    data = make_data()
    stats: dict[int, torch.Tensor] = {}

    def probe(rank: int, engine: ShardedModule) -> None:
        bn = engine.model.get_submodule("stem.1")
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.running_var is not None
        assert bn.running_mean is not None and bn.running_mean.dtype == torch.float32
        stats[rank] = bn.running_var.clone()

    sharded_run(TinyNet, job, 1, data, units=UNITS, probe=probe, param_dtype=torch.bfloat16)
    assert not torch.equal(stats[0], torch.ones_like(stats[0]))  # updated from the batches


def test_param_dtype_names_and_validation() -> None:
    assert precision.param_dtype("bfloat16") is torch.bfloat16
    assert precision.param_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="param_dtype"):
        precision.param_dtype("int8")
    assert JobSpec().param_dtype == "float32"
    assert JobSpec(param_dtype="float16").param_dtype == "float16"
    with pytest.raises(ValidationError):
        JobSpec(param_dtype="fp8")  # type: ignore[arg-type]
    assert JobSpec(param_dtype="bfloat16").hash != JobSpec().hash


def test_engine_rejects_bad_dtype_and_unit_changes_only_when_free() -> None:
    from communication.group import PeerGroup
    from communication.testing import FakeHub

    model = TinyNet()
    group = PeerGroup("job", 0, 0, ("127.0.0.1:9000",))
    backend = FakeHub(1).backend(0)
    with pytest.raises(ValueError, match="param_dtype"):
        ShardedModule(model, group, backend, plan=plan_model(model, 1, UNITS), param_dtype=torch.int8)
    engine = ShardedModule(
        TinyNet(), group, backend, plan=plan_model(TinyNet(), 1, UNITS), param_dtype=torch.bfloat16
    )
    unit = engine.units[0]
    with pytest.raises(ValueError, match="slots"):
        unit.set_param_dtype(torch.bfloat16, frozenset({99}))
    engine.begin(0)
    engine._ensure_ready(unit)
    assert unit.gathered_dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="free"):
        unit.set_param_dtype(torch.float32)
    with pytest.raises(RuntimeError, match="gathered in"):
        engine._ensure_ready(unit, master=True)
    engine._free(unit)
    engine._ensure_ready(unit, master=True)
    assert unit.gathered_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in unit.params)
    engine.close()
    backend.close()


class NormNet(torch.nn.Module):
    """GroupNorm and LayerNorm, no BatchNorm and no residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(2, 8))
        self.flat = torch.nn.Flatten()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(8 * 8 * 8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.flat(self.conv(x))))


def test_group_and_layer_norm_compute_in_fp32_with_their_own_parameters() -> None:
    """Under bf16 every parameterised layer gets an input of its parameters' dtype (bf16 for convolutions
    and linears; fp32 for GroupNorm and LayerNorm, whose output goes back to bf16): the mix CUDA's norm
    kernels refuse never happens, whatever the device. A step trains and stays finite."""
    seen: dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]] = {}

    def probe(rank: int, engine: ShardedModule) -> None:
        for name, module in engine.model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and name:

                def record(
                    m: torch.nn.Module, args: tuple[torch.Tensor], out: torch.Tensor, n: str = name
                ) -> None:
                    seen[n] = (args[0].dtype, m.weight.dtype, out.dtype)

                module.register_forward_hook(record)

    job = _job(steps=2)
    got = sharded_run(
        NormNet, job, 1, make_data(), units=["conv", "mlp", "head"], probe=probe, param_dtype=torch.bfloat16
    )
    assert all(torch.isfinite(t).all() for t in got[0].values())
    bf16, fp32 = torch.bfloat16, torch.float32
    assert seen["conv.0"] == (bf16, bf16, bf16) and seen["mlp.0"] == (bf16, bf16, bf16)
    assert seen["head"] == (bf16, bf16, bf16)
    assert seen["conv.1"] == (fp32, fp32, bf16) and seen["mlp.1"] == (fp32, fp32, bf16)
