"""Users' own models, named by where their factory lives.

A job's ``model`` is a registry name (``resnet18``) or a factory:

- ``package.module:function``: an importable module (on ``PYTHONPATH``);
- ``path/to/file.py:function``: a Python file (a relative path is taken from the worker's working directory);
- ``torchvision:NAME``: ``torchvision.models.NAME``, when torchvision is installed.

The factory is called as ``function(num_classes=..., in_channels=...)`` (torchvision's as
``NAME(num_classes=...)``, 3 channels only) and must return an ``nn.Module``. Its ZeRO-3 units are its
``zerowire_units()`` when it defines one, and otherwise its direct children that hold parameters, in order
(``worker.models.units``). Every worker must reach the same factory: the job carries its name, not its code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

ModelFactory = Callable[[int, int], nn.Module]


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a factory (``where:function``) rather than a registry model."""
    return ":" in name


def user_factory(name: str) -> ModelFactory:
    """The factory ``name`` names (see the module docstring); ValueError, naming it, when it cannot be
    found or is not callable."""
    where, _, attr = name.rpartition(":")
    if not where or not attr.isidentifier():
        raise ValueError(
            f"--model {name!r}: expected module:function, path/to/file.py:function or torchvision:NAME"
        )
    if where == "torchvision":
        return _torchvision(attr)
    if where.endswith(".py"):
        module = _load_file(Path(where), name)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ValueError(f"--model {name!r}: cannot import {where}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {name!r}: {where} has no function {attr}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = fn(num_classes=num_classes, in_channels=in_channels)
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def _load_file(path: Path, name: str) -> object:
    if not path.is_file():
        raise ValueError(f"--model {name!r}: no file {path}")
    module_name = f"zerowire_user_model_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--model {name!r}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report its error with its name
        raise ValueError(f"--model {name!r}: {path} failed to load: {type(exc).__name__}: {exc}") from None
    sys.modules[module_name] = module
    return module


def _torchvision(attr: str) -> ModelFactory:
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError:
        raise ValueError(f"--model torchvision:{attr} needs torchvision, which is not installed") from None
    fn = getattr(models, attr, None)
    if not callable(fn):
        raise ValueError(f"--model torchvision:{attr}: torchvision.models has no {attr}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        if in_channels != 3:
            raise ValueError(
                f"--model torchvision:{attr} takes 3 input channels, the dataset has {in_channels}"
            )
        model = fn(num_classes=num_classes)
        assert isinstance(model, nn.Module)
        return model

    return build
