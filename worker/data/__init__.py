"""Datasets (digits, synthetic, MNIST, CIFAR-10) and the world-size-independent global batch sampler."""

from worker.data.dataset import Augment, Dataset
from worker.data.loaders import DATASET_NAMES, load_dataset
from worker.data.sampler import GlobalBatchSampler, rank_slice, split

__all__ = ["DATASET_NAMES", "Augment", "Dataset", "GlobalBatchSampler", "load_dataset", "rank_slice", "split"]
