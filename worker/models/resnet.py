"""The ResNet family as a flat chain of ZeRO-3 units: ``stem``, ``blocks`` (one per residual block), ``head``.

``forward`` is exactly ``head(blocks[-1](...blocks[0](stem(x))))``, so running :func:`units` one after another
gives bit-identical outputs to ``model(x)``.

Architectures:
- CIFAR ResNet-18/34: 3x3 stem conv (64 ch, stride 1), no max-pool, BasicBlocks at widths 64/128/256/512,
  1x1-conv projection shortcuts.
- ResNet-20/56 (He et al. 2016, section 4.2) and ResNet-8 (the same recipe with n=1): 3x3 stem conv (16 ch),
  three stages of n BasicBlocks at 16/32/64 channels, parameter-free option A shortcuts.
- ImageNet ResNet-50: 7x7 stride-2 stem conv + 3x3 stride-2 max-pool, Bottlenecks at 64/128/256/512
  (expansion 4, stride on the 3x3 conv), projection shortcuts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.models.blocks import BasicBlock, Bottleneck, Shortcut

Block = type[BasicBlock] | type[Bottleneck]


class Head(nn.Module):
    """Global average pooling, flatten, linear classifier.

    Pooling is a plain mean over H and W (deterministic backward on every device, unlike CUDA's adaptive
    average pooling).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """A ResNet whose top-level children are its units in forward order: ``stem``, ``blocks``, ``head``."""

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        _init_weights(self)

    def zerowire_units(self) -> list[nn.Module]:
        """[stem, *blocks, head] in forward order: the ZeRO-3 units (the engine's ``DeclaresUnits`` hook)."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.zerowire_units():
            x = unit(x)
        return x


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, BN weight 1 / bias 0; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stages(
    block: Block, in_ch: int, widths: Sequence[int], depths: Sequence[int], shortcut: Shortcut
) -> tuple[list[nn.Module], int]:
    """Residual blocks of all stages, flattened; the first block of every stage but the first has stride 2."""
    blocks: list[nn.Module] = []
    for stage, (planes, depth) in enumerate(zip(widths, depths, strict=True)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(block(in_ch, planes, stride, shortcut))
            in_ch = planes * block.expansion
    return blocks, in_ch


def cifar_resnet(block: Block, depths: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR-style ResNet-18/34: 3x3 stem, no max-pool, widths 64-512, projection shortcuts."""
    width = 64
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )
    blocks, out_ch = _stages(block, width, (64, 128, 256, 512), depths, "projection")
    return ResNet(stem, blocks, Head(out_ch, num_classes))


def he_cifar_resnet(
    n: int, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "pad"
) -> ResNet:
    """ResNet-(6n+2) of He et al. 2016 for CIFAR-10: 16/32/64 channels, option A shortcuts by default."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    )
    blocks, out_ch = _stages(BasicBlock, 16, (16, 32, 64), (n, n, n), shortcut)
    return ResNet(stem, blocks, Head(out_ch, num_classes))


def imagenet_resnet(
    block: Block, depths: Sequence[int], num_classes: int = 1000, in_channels: int = 3
) -> ResNet:
    """ImageNet ResNet: 7x7 stride-2 stem + max-pool, widths 64-512, projection shortcuts."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    blocks, out_ch = _stages(block, 64, (64, 128, 256, 512), depths, "projection")
    return ResNet(stem, blocks, Head(out_ch, num_classes))
