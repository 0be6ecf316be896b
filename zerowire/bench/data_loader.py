"""The contender of `zerowire bench data`: what a user would write, a plain ``torch.utils.data.DataLoader``
over a map-style dataset of image files, decoded by Pillow with the same transform zerowire applies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from worker.data.decode import Sample, Transform, decode
from worker.data.sampler import GlobalBatchSampler


class Files(Dataset[tuple[torch.Tensor, int]]):
    """Item ``(step, position, index)``: the file, decoded with the draws of that step and position."""

    def __init__(self, files: list[tuple[str, int]], transform: Transform, mean: Any, std: Any) -> None:
        self.files, self.transform = files, transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        step, position, index = item
        path, label = self.files[index]
        arr = decode(self.transform, Sample(path, (step, position)))
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std), label


class Steps(Sampler[tuple[int, int, int]]):
    """The same global batches as zerowire's sampler, step after step."""

    def __init__(self, sampler: GlobalBatchSampler, steps: int) -> None:
        self.sampler, self.steps = sampler, steps

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for step in range(self.steps):
            for position, index in enumerate(self.sampler.indices(step).tolist()):
                yield step, position, int(index)

    def __len__(self) -> int:
        return self.steps * self.sampler.global_batch


def plain_loader(data: Any, sampler: GlobalBatchSampler, steps: int, processes: int) -> DataLoader[Any]:
    files = Files(list(data.index.train), data.transform, data.mean, data.std)
    return DataLoader(
        files,
        batch_size=sampler.global_batch,
        sampler=Steps(sampler, steps),
        num_workers=processes,
        persistent_workers=processes > 0,
    )
