"""Train your own model on your own images with zerowire, from Python.

    python examples/train_my_images.py DIR [OUTPUT]

DIR is an image folder: DIR/train/<class>/*.jpg|png|... (and optionally DIR/val/<class>/*). Without DIR
the example first writes a small one of its own (three classes of coloured noise) to try it out. Two local
worker processes train the model below on it with ZeRO-3 (each holds half of every layer), and the summary
prints what they learned.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from torch import nn

from zerowire.api import ImageFolder, make_job, run_local


def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Any nn.Module will do. Its top-level children become the ZeRO-3 units, in order."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def sample_folder(root: Path, per_class: int = 24) -> Path:
    """A small image folder to try the example on: each class its own mean colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = np.zeros(3)
            colour[c] = 180
            pixels = np.clip(colour + rng.normal(40, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def main(argv: list[str]) -> int:
    scratch = tempfile.mkdtemp(prefix="zerowire-example-")
    root = Path(argv[0]) if argv else sample_folder(Path(scratch) / "images")
    output = Path(argv[1]) if len(argv) > 1 else Path(scratch) / "run"
    job = make_job(
        model=small_cnn,
        data=ImageFolder(root),
        steps=40,
        global_batch=16,
        lr=0.05,
        image_size=32,
        augment="flip",
    )
    summary = run_local(job, workers=2, output=output, data_workers=1, threads=1)
    data = summary["data"]
    print(
        f"trained {summary['steps_done']} steps on {data['train_images']} images of {len(data['classes'])} "
        f"classes ({', '.join(data['classes'])}): test accuracy {summary['test_accuracy']:.2f}; "
        f"model in {summary['model']}"
    )
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
