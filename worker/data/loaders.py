"""``load_dataset(spec, data_dir, seed)``: the datasets a job can name.

Specs:
- ``digits`` (the default): scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, 1 channel), split
  80/20 stratified by class with a constant seed (the split never depends on the job's seed).
- ``synthetic`` or ``synthetic:CxHxW:N``: N deterministic random training images (plus N // 5, at least one,
  test images) from ``seed``; 10 classes, each image = a fixed random class template + Gaussian noise, so the
  labels are learnable. ``synthetic`` alone means ``synthetic:3x32x32:1024``.
- ``mnist:DIR``: the standard IDX files (``train-images-idx3-ubyte`` etc., gzipped or not).
- ``cifar10:DIR``: the standard binary version (``data_batch_1..5.bin``, ``test_batch.bin``), in DIR or in
  ``DIR/cifar-10-batches-bin``; training inputs get seeded crop + flip augmentation.
- ``imagefolder:DIR``: a tree of image files (``DIR/train/<class>/*``, optionally ``DIR/val/<class>/*``),
  indexed and streamed from disk (``worker.data.imagefolder``, ``worker.data.stream``), never held whole.

A relative DIR resolves against ``data_dir`` when given; ``mnist`` / ``cifar10`` without a DIR use
``data_dir``.
Images are scaled to [0, 1] and standardised per channel with the train split's mean and std.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import torch

from jobspec import JobSpec
from worker.data.augment import CropFlip
from worker.data.dataset import Dataset, TrainData, normalise_
from worker.data.formats import read_cifar10, read_mnist_split
from worker.data.imagefolder import ImageOptions
from worker.data.sampler import mix_seed

log = logging.getLogger(__name__)

DATASET_NAMES = ("digits", "synthetic", "mnist", "cifar10", "imagefolder")
DIGITS_SPLIT_SEED = 20_160_101  # constant: the digits split is the same for every job
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_DEFAULT = "3x32x32:1024"
SYNTHETIC_MAX_ELEMENTS = 1 << 30
_SYNTHETIC_RE = re.compile(r"^(\d+)x(\d+)x(\d+)(?::(\d+))?$")


def job_dataset(job: JobSpec, data_dir: Path | None = None, loaders: int = 0) -> TrainData:
    """The dataset of ``job`` (``loaders``: decoding processes of a streamed dataset; 0: none)."""
    images = ImageOptions(
        size=job.image_size,
        channels=job.channels,
        augment=job.augment,
        val_fraction=job.val_fraction,
        bad_images=job.bad_images,
        loaders=loaders,
    )
    return load_dataset(job.dataset, data_dir, job.seed, images)


def load_dataset(
    spec: str, data_dir: Path | None = None, seed: int = 0, images: ImageOptions | None = None
) -> TrainData:
    """Load the dataset named by ``spec`` (see the module docstring); ``images``: the options of an
    ``imagefolder`` dataset (the job's, and the worker's loader processes).

    Raises ``ValueError`` for a bad spec or a malformed file, ``FileNotFoundError`` for a missing one.
    """
    name, _, arg = spec.strip().partition(":")
    if name == "imagefolder":
        from worker.data.imagefolder import check_options, index
        from worker.data.stream import StreamingImages

        options = images or ImageOptions()
        check_options(options)
        return StreamingImages(index(_resolve_dir(name, arg, data_dir), options, seed), options, seed)
    if name == "digits":
        if arg:
            raise ValueError(f"dataset 'digits' takes no argument, got {spec!r}")
        return load_digits()
    if name == "synthetic":
        return load_synthetic(arg or SYNTHETIC_DEFAULT, seed)
    if name == "mnist":
        return load_mnist(_resolve_dir(name, arg, data_dir))
    if name == "cifar10":
        return load_cifar10(_resolve_dir(name, arg, data_dir), seed)
    raise ValueError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASET_NAMES)} (see --help)")


def _resolve_dir(name: str, arg: str, data_dir: Path | None) -> Path:
    if not arg:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs a directory: '{name}:DIR' or a data directory")
        return Path(data_dir)
    path = Path(arg).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = Path(data_dir) / path
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: directory {path} does not exist")
    return path


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices; each class contributes ``round(test_fraction * count)`` test samples."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(idx.size)]
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as its ``load_digits`` returns them (images 1797 x 8 x 8, targets), read
    from the package's data file without importing scikit-learn (an import that costs every worker a
    second); through scikit-learn itself where the file is not where it keeps it."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape((-1, 8, 8)), data[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def load_digits() -> Dataset:
    raw_images, raw_labels = digits_arrays()
    images = np.asarray(raw_images, dtype=np.float64) / 16.0  # pixel values are 0..16
    labels = np.asarray(raw_labels, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    x = torch.from_numpy(images).float().unsqueeze(1)
    train_x, test_x = normalise_(x[train_idx], x[test_idx])
    y = torch.from_numpy(labels)
    log.info("digits: %d train / %d test images of 1x8x8", len(train_idx), len(test_idx))
    return Dataset(train_x, y[train_idx], test_x, y[test_idx], num_classes=10, in_channels=1, name="digits")


def load_synthetic(shape_spec: str, seed: int) -> Dataset:
    m = _SYNTHETIC_RE.match(shape_spec)
    if m is None:
        raise ValueError(
            f"synthetic dataset spec must be 'synthetic:CxHxW:N' (e.g. 3x32x32:4096), got {shape_spec!r}"
        )
    c, h, w = (int(m.group(i)) for i in (1, 2, 3))
    n = int(m.group(4)) if m.group(4) else int(SYNTHETIC_DEFAULT.rsplit(":", 1)[1])
    if min(c, h, w, n) < 1:
        raise ValueError(f"synthetic dataset dimensions and size must be >= 1, got {shape_spec!r}")
    n_test = max(1, n // 5)
    if (n + n_test) * c * h * w > SYNTHETIC_MAX_ELEMENTS:
        raise ValueError(
            f"synthetic dataset {shape_spec!r} is too large (over {SYNTHETIC_MAX_ELEMENTS} values)"
        )
    num_classes = 10
    gen = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))
    templates = torch.randn(num_classes, c, h, w, generator=gen)
    y = torch.randint(0, num_classes, (n + n_test,), generator=gen, dtype=torch.int64)
    x = 0.5 * templates[y] + torch.randn(n + n_test, c, h, w, generator=gen)
    return Dataset(
        x[:n].contiguous(),
        y[:n].clone(),
        x[n:].contiguous(),
        y[n:].clone(),
        num_classes=num_classes,
        in_channels=c,
        name=f"synthetic:{c}x{h}x{w}:{n}",
    )


def load_mnist(directory: Path) -> Dataset:
    train_x, train_y = read_mnist_split(directory, "train")
    test_x, test_y = read_mnist_split(directory, "test")
    if train_x.shape[2:] != test_x.shape[2:]:
        raise ValueError(
            f"{directory}: MNIST train images are {tuple(train_x.shape[2:])} "
            f"but test images {tuple(test_x.shape[2:])}"
        )
    tr, te = normalise_(train_x.float().div_(255.0), test_x.float().div_(255.0))
    log.info("mnist: %d train / %d test images from %s", len(train_y), len(test_y), directory)
    return Dataset(tr, train_y, te, test_y, num_classes=10, in_channels=1, name="mnist")


def load_cifar10(directory: Path, seed: int) -> Dataset:
    train_x, train_y, test_x, test_y = read_cifar10(directory)
    tr, te = normalise_(train_x.float().div_(255.0), test_x.float().div_(255.0))
    log.info("cifar10: %d train / %d test images from %s", len(train_y), len(test_y), directory)
    return Dataset(
        tr, train_y, te, test_y, num_classes=10, in_channels=3, name="cifar10", augment=CropFlip(seed)
    )
