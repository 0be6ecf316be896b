"""The in-memory dataset every worker trains on, and train-split normalisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Plan = Callable[[int], tuple[torch.Tensor, int]]  # step -> (this rank's sample indices, their offset)


class Augment(Protocol):
    """Seeded per-sample augmentation of a slice of a global batch.

    ``augment(x, step, offset)``: ``x`` holds the samples at positions ``offset, offset + 1, ...`` of the
    global batch of ``step``; sample ``offset + i`` is transformed by random draws keyed by (dataset seed,
    step, offset + i) only, so a rank augmenting its micro-batch gets exactly the rows a single process gets
    when it augments the whole global batch. Returns a new tensor; ``x`` is not modified.
    """

    def __call__(self, x: torch.Tensor, step_seed: int, offset: int = 0) -> torch.Tensor: ...


class TrainData(Protocol):
    """What the trainer reads of a dataset: in memory (:class:`Dataset`) or streamed from files
    (``worker.data.stream.StreamingImages``)."""

    @property
    def name(self) -> str: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def train_size(self) -> int: ...

    @property
    def test_size(self) -> int: ...

    def train_batch(
        self, indices: torch.Tensor, step: int, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (float32, normalised, augmented) and labels of the training samples ``indices``, which sit
        at positions ``offset, offset + 1, ...`` of the global batch of ``step``."""

    def test_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def follow(self, plan: Plan | None, pin_memory: bool = False) -> None:
        """How to find this rank's micro-batch of every later step (a streamed dataset reads ahead)."""

    def take_wait(self) -> float:
        """Seconds the step loop spent waiting for data since the last call."""

    def describe(self) -> dict[str, Any]:
        """What a run's summary records of the dataset (classes, normalisation, files skipped)."""

    def close(self) -> None:
        """Let go of what reads the dataset (a streamed dataset's loader processes)."""


@dataclass(frozen=True)
class Dataset:
    """Normalised images (float32, N x C x H x W) and int64 labels of a train and a test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    name: str
    augment: Augment | None = None

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            where = f"{self.name}: {split}"
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(
                    f"{where} images must be float32 N x C x H x W, got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{where} labels must be int64 of shape ({x.shape[0]},), got {tuple(y.shape)}"
                )
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{where} images have {x.shape[1]} channels, expected {self.in_channels}")
            if y.numel() and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
                raise ValueError(f"{where} labels outside 0..{self.num_classes - 1}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train and test image shapes differ")

    def train_batch(
        self, indices: torch.Tensor, step: int, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the training samples ``indices``.

        ``indices`` sit at positions ``offset, offset + 1, ...`` of the global batch of ``step``; inputs are
        augmented (keyed by step and position) when the dataset augments.
        """
        x, y = self.train_x[indices], self.train_y[indices]
        if self.augment is not None:
            x = self.augment(x, step, offset)
        return x, y

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_x.shape[0])

    def test_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_x[indices], self.test_y[indices]

    def follow(self, plan: Plan | None, pin_memory: bool = False) -> None:
        pass  # in memory: nothing to read ahead

    def take_wait(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


def normalise_(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both float32 splits in place, per channel, with the train split's mean and std.

    Statistics are computed in float64 one channel at a time (bounded extra memory). Returns the inputs.
    """
    if train.dtype != torch.float32 or test.dtype != torch.float32:
        raise ValueError(f"normalise_ needs float32 tensors, got {train.dtype} and {test.dtype}")
    for c in range(train.shape[1]):
        plane = train[:, c].double()
        mean = float(plane.mean())
        std = max(float(plane.std()), 1e-12) if plane.numel() > 1 else 1.0
        train[:, c].sub_(mean).div_(std)
        test[:, c].sub_(mean).div_(std)
    return train, test
