"""Residual blocks of the ResNet family: BasicBlock (two 3x3 convs) and Bottleneck (1x1-3x3-1x1).

Shortcuts, when the shape changes:
- ``"projection"``: 1x1 convolution (with the block's stride) + BatchNorm (He et al. 2016, option B);
- ``"pad"``: parameter-free identity, subsampled by the stride and zero-padded in channels (option A, the one
  the paper uses for its CIFAR-10 ResNet-20/32/44/56/110).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["projection", "pad"]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: take every ``stride``-th pixel, zero-pad the extra channels (half each side)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"a padding shortcut cannot reduce channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad_lo = (out_ch - in_ch) // 2
        self.pad_hi = out_ch - in_ch - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_lo}, {self.pad_hi})"


def make_shortcut(in_ch: int, out_ch: int, stride: int, kind: Shortcut) -> nn.Module:
    """Identity when the shape is unchanged, else the requested kind of shortcut."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "projection":
        return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    if kind == "pad":
        return PadShortcut(in_ch, out_ch, stride)
    raise ValueError(f"unknown shortcut kind {kind!r}; expected 'projection' or 'pad'")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, shortcut: Shortcut = "projection") -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(in_ch, out_ch, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus the shortcut, then ReLU (ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, shortcut: Shortcut = "projection") -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(in_ch, out_ch, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))
