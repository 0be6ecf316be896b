"""Model registry: ``build_model(name, num_classes, in_channels)`` (a built-in ResNet or a user's factory) and
``units(model)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from worker.models.blocks import BasicBlock, Bottleneck
from worker.models.resnet import ResNet, cifar_resnet, he_cifar_resnet, imagenet_resnet
from worker.models.user import is_factory_name, user_factory
from worker.zero3.plan import DeclaresUnits

_Factory = Callable[[int, int], ResNet]

_REGISTRY: dict[str, _Factory] = {
    "resnet8": lambda nc, ic: he_cifar_resnet(1, nc, ic),
    "resnet20": lambda nc, ic: he_cifar_resnet(3, nc, ic),
    "resnet56": lambda nc, ic: he_cifar_resnet(9, nc, ic),
    "resnet18": lambda nc, ic: cifar_resnet(BasicBlock, (2, 2, 2, 2), nc, ic),
    "resnet34": lambda nc, ic: cifar_resnet(BasicBlock, (3, 4, 6, 3), nc, ic),
    "resnet50": lambda nc, ic: imagenet_resnet(Bottleneck, (3, 4, 6, 3), nc, ic),
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model (initialisation draws from torch's global RNG: seed it first):
    ``name`` is a registry name or a user's factory (``worker.models.user``)."""
    factory: Callable[[int, int], nn.Module] | None = (
        user_factory(name) if is_factory_name(name) else _REGISTRY.get(name)
    )
    if factory is None:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}, or module:function, "
            "path/to/file.py:function, torchvision:NAME"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return factory(num_classes, in_channels)


def units(model: nn.Module) -> list[nn.Module]:
    """The model's ZeRO-3 units in forward order (what the workers hand the engine).

    A model that declares them (``zerowire_units()``) gets those: every model of the registry, a
    :class:`ResNet`, returns ``[stem, *blocks, head]``, and running them in order is exactly
    ``model.forward``. Any other module: its direct children that hold parameters, in registration order;
    parameters of the model itself go to the engine's root unit.
    """
    if isinstance(model, DeclaresUnits):
        return list(model.zerowire_units())
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    if not children and not any(True for _ in model.parameters(recurse=False)):
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    return children
