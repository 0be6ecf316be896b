"""``imagefolder:DIR``: a user's tree of image files, indexed, never loaded whole.

Layout: ``DIR/train/<class>/<file>`` and, when present, ``DIR/val/<class>/<file>`` as the test split; without
``val/`` a seeded, stratified ``val_fraction`` of the train files is held out. Classes are the train folder's
subfolders sorted by name (as torchvision's ``ImageFolder``); files are those whose extension Pillow
registers, sorted. Channels: the job's ``channels``, or (0) from the first train image: grey -> 1, anything
else -> 3. Normalisation: per-channel mean and std of a seeded sample of at most ``STATS_SAMPLE`` train
images, decoded as evaluation decodes them (recorded in ``describe()``).

The samples are decoded by ``worker.data.stream.Loader`` as steps ask for them; this module only knows the
files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.data.decode import AUGMENTS, BadImage, Sample, Transform, decode

log = logging.getLogger(__name__)

STATS_SAMPLE = 256
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P;L")


@dataclass(frozen=True)
class ImageOptions:
    """The job's image options (``jobspec.JobSpec``) and the worker's loader processes."""

    size: int = 224
    channels: int = 0  # 0: from the first train image
    augment: str = "rrc-flip"
    val_fraction: float = 0.1
    bad_images: str = "fail"  # or "skip"
    loaders: int = 0  # decoding processes; 0: on the calling thread


@dataclass(frozen=True)
class ImageIndex:
    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label)
    test: tuple[tuple[str, int], ...]
    channels: int
    held_out: bool  # the test split is held out of train/ (no val/ folder)


def _extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _files(split: Path, classes: list[str], extensions: set[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = split / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions:
                out.append((str(f), label))
    return out


def index(root: Path, options: ImageOptions, seed: int) -> ImageIndex:
    """The files of ``root`` by split and class; ValueError naming what is missing."""
    from worker.data.loaders import stratified_split

    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"imagefolder {root}: no train/ folder (expected train/<class>/<files>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"imagefolder {root}: train/ needs at least two class folders, found {classes}")
    extensions = _extensions()
    train = _files(train_dir, classes, extensions)
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in train)]
    if empty:
        raise ValueError(f"imagefolder {root}: class folders without images: {empty[:5]}")
    val_dir = root / "val"
    held_out = not val_dir.is_dir()
    if held_out:
        labels = np.array([label for _, label in train], dtype=np.int64)
        keep, hold = stratified_split(labels, options.val_fraction, seed)
        test = [train[i] for i in hold]
        train = [train[i] for i in keep]
    else:
        unknown = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise ValueError(f"imagefolder {root}: val/ has classes that train/ lacks: {unknown[:5]}")
        test = _files(val_dir, classes, extensions)
    if not train or not test:
        raise ValueError(f"imagefolder {root}: {len(train)} train and {len(test)} test images")
    channels = options.channels or _channels_of(train[0][0])
    log.info(
        "imagefolder %s: %d classes, %d train / %d test images (%s), %d channel(s)",
        root,
        len(classes),
        len(train),
        len(test),
        "held out of train/" if held_out else "val/",
        channels,
    )
    return ImageIndex(root, tuple(classes), tuple(train), tuple(test), channels, held_out)


def _channels_of(path: str) -> int:
    try:
        with Image.open(path) as im:
            return 1 if im.mode in GREY_MODES else 3
    except OSError as exc:
        raise BadImage(f"{path}: cannot decode as an image: {exc}") from None


def normalisation(idx: ImageIndex, t: Transform, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of values in [0, 1]) over a seeded sample of the train images, decoded as
    evaluation decodes them; files that cannot be decoded are left out of the sample."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x57A7])))
    n = min(STATS_SAMPLE, len(idx.train))
    chosen = np.sort(rng.choice(len(idx.train), size=n, replace=False))
    sums = np.zeros(t.channels, dtype=np.float64)
    squares = np.zeros(t.channels, dtype=np.float64)
    count = 0
    for i in chosen:
        try:
            x = decode(t, Sample(idx.train[int(i)][0], None)).astype(np.float64) / 255.0
        except BadImage:
            continue
        sums += x.sum(axis=(1, 2))
        squares += (x * x).sum(axis=(1, 2))
        count += x.shape[1] * x.shape[2]
    if count == 0:
        raise BadImage(f"imagefolder {idx.root}: none of {n} sampled train images could be decoded")
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_options(options: ImageOptions) -> None:
    if options.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {options.augment!r}")
    if options.bad_images not in ("fail", "skip"):
        raise ValueError(f"bad_images must be fail or skip, got {options.bad_images!r}")


def describe(idx: ImageIndex, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    return {
        "classes": list(idx.classes),
        "train_images": len(idx.train),
        "test_images": len(idx.test),
        "test_split": "held out of train/" if idx.held_out else "val/",
        "channels": idx.channels,
        "normalisation": {"mean": list(mean), "std": list(std)},
    }
