"""MNIST IDX and CIFAR-10 binary loaders, on small files written here in the exact standard formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.data import load_dataset
from worker.data.augment import CropFlip

RNG = np.random.default_rng(0)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(
    directory: Path, n_train: int = 12, n_test: int = 5, size: int = 6, gz: bool = False
) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        data = idx_bytes(0x803 if array.ndim == 3 else 0x801, array)
        if gz:
            with gzip.open(directory / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (directory / name).write_bytes(data)
    return arrays


def expected_normalised(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    tr, te = train.astype(np.float64) / 255.0, test.astype(np.float64) / 255.0
    mean, std = tr.mean(), tr.std(ddof=1)
    return torch.from_numpy((tr - mean) / std).float(), torch.from_numpy((te - mean) / std).float()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_roundtrip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    data = load_dataset(f"mnist:{tmp_path / 'mnist'}")
    assert data.name == "mnist" and data.in_channels == 1 and data.num_classes == 10
    assert data.train_x.shape == (12, 1, 6, 6) and data.test_x.shape == (5, 1, 6, 6)
    assert torch.equal(data.train_y, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(data.test_y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    tr, te = expected_normalised(arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"])
    torch.testing.assert_close(data.train_x[:, 0], tr, rtol=0, atol=1e-6)
    torch.testing.assert_close(data.test_x[:, 0], te, rtol=0, atol=1e-6)


def test_relative_dir_resolves_against_data_dir(tmp_path: Path) -> None:
    write_mnist(tmp_path / "sets" / "mnist")
    assert load_dataset("mnist:mnist", data_dir=tmp_path / "sets").train_x.shape[0] == 12
    assert load_dataset("mnist", data_dir=tmp_path / "sets" / "mnist").test_x.shape[0] == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist:elsewhere", data_dir=tmp_path)


def corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("bad_magic", "bad IDX magic number 0x00000804, expected 0x00000803"),
        ("truncated", "does not match the header dims"),
        ("short_header", "shorter than the 16-byte IDX header"),
        ("count_mismatch", "holds 12 images but .* holds 11 labels"),
        ("bad_label", "label 10 outside 0..9"),
        ("bad_gzip", "not a valid gzip file"),
    ],
)
def test_mnist_corruption_is_reported(tmp_path: Path, damage: str, match: str) -> None:
    arrays = write_mnist(tmp_path)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if damage == "bad_magic":
        corrupt(images, struct.pack(">I", 0x804) + images.read_bytes()[4:])
    elif damage == "truncated":
        corrupt(images, images.read_bytes()[:-1])
    elif damage == "short_header":
        corrupt(images, images.read_bytes()[:10])
    elif damage == "count_mismatch":
        corrupt(labels, idx_bytes(0x801, arrays["train-labels-idx1-ubyte"][:11]))
    elif damage == "bad_label":
        corrupt(labels, idx_bytes(0x801, np.full(12, 10, dtype=np.uint8)))
    elif damage == "bad_gzip":
        images.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=match):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_missing_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"):
        load_dataset(f"mnist:{tmp_path}")


def write_cifar(directory: Path, per_file: int = 4) -> dict[str, np.ndarray]:
    """Six batch files of ``per_file`` records: label byte, then 1024 R, 1024 G, 1024 B bytes (row-major)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]:
        rec = np.empty((per_file, 3073), dtype=np.uint8)
        rec[:, 0] = RNG.integers(0, 10, per_file)
        rec[:, 1:] = RNG.integers(0, 256, (per_file, 3072))
        (directory / name).write_bytes(rec.tobytes())
        records[name] = rec
    return records


@pytest.mark.parametrize("subdir", [False, True])
def test_cifar10_roundtrip(tmp_path: Path, subdir: bool) -> None:
    root = tmp_path / "cifar"
    records = write_cifar(root / "cifar-10-batches-bin" if subdir else root)
    data = load_dataset("cifar10:cifar", data_dir=tmp_path, seed=5)
    assert data.name == "cifar10" and data.in_channels == 3 and data.num_classes == 10
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    train = np.concatenate([records[f"data_batch_{i}.bin"] for i in range(1, 6)])
    test = records["test_batch.bin"]
    assert torch.equal(data.train_y, torch.from_numpy(train[:, 0]).long())
    assert torch.equal(data.test_y, torch.from_numpy(test[:, 0]).long())
    # Channel layout: pixel (c, row, col) of record k is byte 1 + 1024 c + 32 row + col.
    raw_train = torch.from_numpy(train[:, 1:].reshape(-1, 3, 32, 32).astype(np.float64) / 255.0)
    mean = raw_train.mean(dim=(0, 2, 3), keepdim=True)
    std = raw_train.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.train_x.double() * std + mean, raw_train, rtol=0, atol=1e-6)
    assert float(data.train_x[2, 1, 5, 7] * std[0, 1, 0, 0] + mean[0, 1, 0, 0]) == pytest.approx(
        train[2, 1 + 1024 + 32 * 5 + 7] / 255.0, abs=1e-6
    )
    assert isinstance(data.augment, CropFlip) and data.augment.seed == 5


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("ragged", ValueError, "not a positive multiple of the 3073-byte record"),
        ("empty", ValueError, "not a positive multiple"),
        ("bad_label", ValueError, "record 1 has label 12 outside 0..9"),
        ("missing_batch", FileNotFoundError, "data_batch_3.bin"),
        ("missing_test", FileNotFoundError, "CIFAR-10 binary files"),
    ],
)
def test_cifar10_corruption_is_reported(
    tmp_path: Path, damage: str, error: type[Exception], match: str
) -> None:
    write_cifar(tmp_path)
    batch = tmp_path / "data_batch_3.bin"
    if damage == "ragged":
        batch.write_bytes(batch.read_bytes() + b"\x00")
    elif damage == "empty":
        batch.write_bytes(b"")
    elif damage == "bad_label":
        data = bytearray(batch.read_bytes())
        data[3073] = 12
        batch.write_bytes(bytes(data))
    elif damage == "missing_batch":
        batch.unlink()
    elif damage == "missing_test":
        (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(error, match=match):
        load_dataset(f"cifar10:{tmp_path}")
