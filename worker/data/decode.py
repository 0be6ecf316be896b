"""Decoding one image file into a training or evaluation sample: Pillow and numpy only, so the loader
processes that run it (``worker.data.stream``) start without torch.

Every random draw of a training sample comes from a generator keyed by ``(seed, step, position in the global
batch)``: a sample is the same whichever process decodes it and however the batch is split over workers.

Transforms (``augment``):
- ``rrc-flip``: a random-resized crop (area 8%-100% of the image, aspect ratio 3/4-4/3, as torchvision's
  ``RandomResizedCrop``) resized to ``size`` x ``size``, then a horizontal flip with probability 1/2;
- ``crop-flip``: the shorter side resized to ``size * 8 / 7``, a random ``size`` x ``size`` crop, a flip;
- ``flip``: resized to ``size`` x ``size``, a flip;
- ``none``: resized to ``size`` x ``size``.
Evaluation, where training crops (``rrc-flip``, ``crop-flip``), resizes the shorter side to ``size * 8 / 7``
and takes the center ``size`` x ``size``; otherwise it resizes to ``size`` x ``size`` as training does.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

AUGMENTS = ("none", "flip", "crop-flip", "rrc-flip")
CROPPING = ("crop-flip", "rrc-flip")


class BadImage(ValueError):
    """A file that cannot be decoded as an image (the message names it)."""


@dataclass(frozen=True)
class Transform:
    size: int
    channels: int  # 1 (grey) or 3 (RGB): every image is converted to it
    augment: str
    seed: int


@dataclass(frozen=True)
class Sample:
    """A sample to decode: its file, and its (step, position) key (None: evaluation, no random draw)."""

    path: str
    key: tuple[int, int] | None


PARENT_CHECK_S = 0.5


def loader_init(parent: int) -> None:
    """The start of a loader process. A loader waiting for work ends when its worker's end closes the pool's
    pipes; a watchdog thread also ends one busy decoding within ``PARENT_CHECK_S`` of the end of the worker
    that started it (a SIGKILLed worker included), so no loader outlives its worker. (The kernel's
    parent-death signal would fire when the worker's *thread* that started the pool ends, which the
    training threads of successive epochs do.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="loader-watchdog", daemon=True).start()


def decode_many(t: Transform, samples: list[Sample]) -> tuple[np.ndarray, list[str]]:
    """uint8 C x S x S arrays of ``samples`` stacked (N x C x S x S) and the error of each one that could not
    be decoded ("" where it was; its rows are zeros)."""
    out = np.zeros((len(samples), t.channels, t.size, t.size), dtype=np.uint8)
    errors = [""] * len(samples)
    for i, s in enumerate(samples):
        try:
            out[i] = decode(t, s)
        except BadImage as exc:
            errors[i] = str(exc)
    return out, errors


def decode(t: Transform, sample: Sample) -> np.ndarray:
    """One sample as uint8 C x S x S; BadImage naming the file when it cannot be decoded."""
    try:
        with Image.open(sample.path) as im:
            if sample.key is None or t.augment != "rrc-flip":  # a crop of 8% of the area needs every pixel
                side = round(t.size * 8 / 7)
                im.draft("L" if t.channels == 1 else "RGB", (side, side))  # JPEG: decode at a reduced scale
            img = im.convert("L" if t.channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{sample.path}: cannot decode as an image: {exc}") from None
    if sample.key is None:
        img = _eval(img, t)
    else:
        img = _train(img, t, _rng(t.seed, *sample.key))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _rng(seed: int, step: int, position: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, position, 0x5A11])))


def _eval(img: Image.Image, t: Transform) -> Image.Image:
    if t.augment not in CROPPING:
        return img.resize((t.size, t.size), Image.Resampling.BILINEAR)
    img = _shorter_side(img, round(t.size * 8 / 7))
    left, top = (img.width - t.size) // 2, (img.height - t.size) // 2
    return img.crop((left, top, left + t.size, top + t.size))


def _train(img: Image.Image, t: Transform, rng: np.random.Generator) -> Image.Image:
    if t.augment == "rrc-flip":
        box = _rrc_box(img.width, img.height, rng)
        img = img.resize((t.size, t.size), Image.Resampling.BILINEAR, box=box)
    elif t.augment == "crop-flip":
        img = _shorter_side(img, round(t.size * 8 / 7))
        left = int(rng.integers(0, img.width - t.size + 1))
        top = int(rng.integers(0, img.height - t.size + 1))
        img = img.crop((left, top, left + t.size, top + t.size))
    else:
        img = img.resize((t.size, t.size), Image.Resampling.BILINEAR)
    if t.augment != "none" and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _shorter_side(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        return img.resize((side, max(side, round(h * side / w))), Image.Resampling.BILINEAR)
    return img.resize((max(side, round(w * side / h)), side), Image.Resampling.BILINEAR)


def _rrc_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a random-resized crop: area 8%-100%, log-uniform aspect 3/4-4/3, ten
    tries, then the largest center crop within the aspect range."""
    area = width * height
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(lo, hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)
