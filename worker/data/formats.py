"""Readers for the standard on-disk formats: MNIST IDX files (optionally gzipped) and CIFAR-10 binary batches.

Both return raw uint8 images (N x C x H x W) and int64 labels, after checking headers and sizes; any mismatch
is a ``ValueError`` naming the file and what was wrong.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_SUBDIR = "cifar-10-batches-bin"


def _find(directory: Path, name: str) -> Path:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) not found in {directory}")


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc})") from exc
    return path.read_bytes()


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file of unsigned bytes with the expected ``magic`` (which fixes the number of dimensions)."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than the {header}-byte IDX header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path}: size {len(data)} bytes does not match the header dims {dims} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 1 x H x W, uint8) and labels (int64) of the MNIST ``train`` or ``test`` split."""
    images_name, labels_name = MNIST_FILES[split]
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def cifar_dir(directory: Path) -> Path:
    """``directory`` itself or its ``cifar-10-batches-bin`` subfolder, whichever holds the batch files."""
    for candidate in (directory, directory / CIFAR_SUBDIR):
        if (candidate / CIFAR_TEST_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"CIFAR-10 binary files ({CIFAR_TEST_FILE}, data_batch_1..5.bin) not found in {directory} "
        f"or {directory / CIFAR_SUBDIR}"
    )


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32 x 32)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file {path} not found")
    data = path.read_bytes()
    if not data or len(data) % CIFAR_RECORD:
        raise ValueError(
            f"{path}: size {len(data)} bytes is not a positive multiple of the {CIFAR_RECORD}-byte record"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{path}: record {bad} has label {int(labels[bad])} outside 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_cifar10(directory: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train (data_batch_1..5) and test (test_batch) images and labels."""
    root = cifar_dir(directory)
    train = [read_cifar_batch(root / name) for name in CIFAR_TRAIN_FILES]
    test_x, test_y = read_cifar_batch(root / CIFAR_TEST_FILE)
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y
