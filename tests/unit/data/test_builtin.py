"""The built-in datasets: digits (real, bundled with scikit-learn) and synthetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.data import Dataset, load_dataset
from worker.data.loaders import DIGITS_SPLIT_SEED, stratified_split


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_and_split_sizes(digits: Dataset) -> None:
    assert digits.name == "digits" and digits.num_classes == 10 and digits.in_channels == 1
    assert digits.train_x.shape == (1438, 1, 8, 8) and digits.test_x.shape == (359, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.augment is None
    # Stratified: every class has about 20% of its images in the test split.
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # Normalised with train statistics: train is standard, test close to it.
    assert abs(digits.train_x.mean().item()) < 1e-5 and abs(digits.train_x.std().item() - 1) < 1e-4
    assert abs(digits.test_x.mean().item()) < 0.1


def test_digits_split_does_not_depend_on_job_seed(digits: Dataset) -> None:
    other = load_dataset("digits", seed=12345)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(digits, name), getattr(other, name))


def test_digits_split_matches_the_raw_data(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    train_idx, test_idx = stratified_split(raw.target, 0.2, DIGITS_SPLIT_SEED)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(len(raw.target)))
    assert torch.equal(digits.test_y, torch.from_numpy(raw.target[test_idx]).long())
    # Undo the normalisation of the train split: the pixels are the raw pixels / 16.
    scaled = torch.from_numpy(raw.images[train_idx] / 16.0).float()
    mean, std = scaled.double().mean(), scaled.double().std()
    torch.testing.assert_close(digits.train_x[:, 0].double() * std + mean, scaled.double(), atol=1e-5, rtol=0)


def test_synthetic_is_seeded_and_shaped() -> None:
    a = load_dataset("synthetic:3x16x12:50", seed=1)
    b = load_dataset("synthetic:3x16x12:50", seed=1)
    c = load_dataset("synthetic:3x16x12:50", seed=2)
    assert a.train_x.shape == (50, 3, 16, 12) and a.test_x.shape == (10, 3, 16, 12)
    assert a.in_channels == 3 and a.num_classes == 10 and a.name == "synthetic:3x16x12:50"
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    default = load_dataset("synthetic")
    assert default.train_x.shape == (1024, 3, 32, 32) and default.name == "synthetic:3x32x32:1024"
    small = load_dataset("synthetic:1x4x4:2")
    assert small.test_x.shape == (1, 1, 4, 4)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("synthetic:3x32", "synthetic:CxHxW:N"),
        ("synthetic:0x4x4:10", ">= 1"),
        ("synthetic:3x4x4:0", ">= 1"),
        ("synthetic:64x1024x1024:1024", "too large"),
        ("digits:extra", "no argument"),
        ("imagenet", r"unknown dataset 'imagenet'; known datasets: digits, synthetic, mnist, cifar10"),
        ("mnist", "needs a directory"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset(spec)


def test_dataset_validates_its_tensors() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    Dataset(x, y, x, y, num_classes=2, in_channels=1, name="ok")
    with pytest.raises(ValueError, match="float32"):
        Dataset(x.double(), y, x, y, num_classes=2, in_channels=1, name="bad")
    with pytest.raises(ValueError, match="int64"):
        Dataset(x, y[:3], x, y, num_classes=2, in_channels=1, name="bad")
    with pytest.raises(ValueError, match="channels"):
        Dataset(x, y, x, y, num_classes=2, in_channels=3, name="bad")
    with pytest.raises(ValueError, match="outside"):
        Dataset(x, y + 2, x, y, num_classes=2, in_channels=1, name="bad")


def test_digits_read_without_scikit_learn_equal_its_loader() -> None:
    """The bundled digits read from scikit-learn's data file are exactly what its load_digits returns."""
    from sklearn.datasets import load_digits as sk_load_digits

    from worker.data.loaders import digits_arrays

    images, target = digits_arrays()
    bunch = sk_load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)
