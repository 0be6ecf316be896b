"""Datasets (digits, synthetic, MNIST, CIFAR-10, image folders) and the world-size-independent global batch
sampler.

The names below are imported on first use: a loader process, which imports ``worker.data.decode`` only,
then starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.data.dataset import Augment, Dataset, TrainData
    from worker.data.loaders import DATASET_NAMES, job_dataset, load_dataset
    from worker.data.sampler import GlobalBatchSampler, rank_slice, split

_WHERE = {
    "Augment": "dataset",
    "Dataset": "dataset",
    "TrainData": "dataset",
    "DATASET_NAMES": "loaders",
    "job_dataset": "loaders",
    "load_dataset": "loaders",
    "GlobalBatchSampler": "sampler",
    "rank_slice": "sampler",
    "split": "sampler",
}

__all__ = [
    "DATASET_NAMES",
    "Augment",
    "Dataset",
    "GlobalBatchSampler",
    "TrainData",
    "job_dataset",
    "load_dataset",
    "rank_slice",
    "split",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'worker.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"worker.data.{module}"), name)
