"""Small trees of image files for the imagefolder tests: JPEG and PNG, of several sizes, made here (nothing
is downloaded). Each class has its own mean colour, so a model can learn them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "eel")


def make_tree(root: Path, per_class: int = 12, *, val: int = 0, grey: bool = False, seed: int = 0) -> Path:
    """``root/train/<class>/*`` (and ``root/val/<class>/*`` when ``val``): alternating JPEG and PNG files of
    sizes between 20 and 40 pixels a side."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val)):
        if not count:
            continue
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(20, 41, size=2))
                base = np.array([60 + 80 * c, 200 - 60 * c, 40 + 50 * c], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, "RGB")
                if grey:
                    img = img.convert("L")
                ext = "jpg" if i % 2 == 0 else "png"
                img.save(folder / f"{i:03d}.{ext}")
    return root
