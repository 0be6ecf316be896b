"""The engine's mixed-precision policy (the job's ``param_dtype``), after FSDP2's ``MixedPrecisionPolicy``.

- Master weights: every rank's fp32 shard is the master copy; the optimizer updates it in fp32.
- Wire: parameter all-gathers move the fp32 shards; a unit's gathered parameters are then cast to
  ``param_dtype`` and the forward and backward passes compute in it (inputs are cast too; no autocast).
- Gradients: a unit's gradient is computed in ``param_dtype``, accumulated into one flat buffer of that
  dtype, converted to fp32 as a whole and reduce-scattered in fp32 (rank order, as always).
- Normalization layers (BatchNorm, GroupNorm, LayerNorm) keep fp32 parameters while the rest of their unit
  is cast. BatchNorm's kernels take ``param_dtype`` input with fp32 parameters, compute the batch statistics
  in fp32 and return ``param_dtype``, and its running statistics stay fp32 buffers. GroupNorm and LayerNorm
  compute in fp32 (``FP32_COMPUTE``): their input is cast up and their output back to ``param_dtype``, as
  autocast runs them, since their CUDA kernels refuse a reduced input with fp32 parameters. Statistics of
  a batch in bf16 would lose most of their digits, and running statistics updated in bf16 stall (an update
  of 0.1 x a small difference rounds away).
- The loss is computed in fp32 (the trainer casts the logits).
- ``float16`` has no loss scaling: gradients below its range flush to zero. ``bfloat16`` is the
  reduced precision to prefer.

With ``param_dtype`` float32 nothing is cast and the engine is exactly the fp32 engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from worker.zero3.flat_unit import FlatUnit

PARAM_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Modules whose parameters stay fp32 under a reduced param_dtype.
FP32_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
# ... and those of them that also compute in fp32 (input cast up, output cast back).
FP32_COMPUTE: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm)


def param_dtype(name: str) -> torch.dtype:
    """The torch dtype of a job's ``param_dtype`` name; ValueError for any other name."""
    try:
        return PARAM_DTYPES[name]
    except KeyError:
        raise ValueError(f"param_dtype must be one of {sorted(PARAM_DTYPES)}, got {name!r}") from None


def check_param_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in PARAM_DTYPES.values():
        raise ValueError(f"param_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def keeps_fp32(model: nn.Module, param_name: str) -> bool:
    """Whether the parameter ``param_name`` of ``model`` belongs to a layer that stays fp32."""
    owner = param_name.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    return isinstance(module, FP32_MODULES)


def configure_units(model: nn.Module, units: Sequence[FlatUnit], dtype: torch.dtype) -> torch.dtype:
    """Set every unit of ``model`` to compute in ``dtype`` (normalization layers' parameters stay fp32)."""
    check_param_dtype(dtype)
    for unit in units:
        keep = (i for i, s in enumerate(unit.plan.params) if keeps_fp32(model, s.name))
        unit.set_param_dtype(dtype, frozenset(keep))
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, FP32_COMPUTE) and not getattr(module, "_zerowire_fp32", False):
                module.register_forward_pre_hook(_inputs_to_fp32)
                module.register_forward_hook(partial(_output_to, dtype))
                module._zerowire_fp32 = True  # type: ignore[assignment]
    return dtype


def _inputs_to_fp32(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _output_to(dtype: torch.dtype, module: nn.Module, args: tuple[object, ...], out: object) -> object:
    return out.to(dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point model input in the compute dtype (labels and other integers pass unchanged)."""
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
