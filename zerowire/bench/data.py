"""`zerowire bench data`: how fast zerowire's loader feeds a step, against what a user would write.

Speed (default): a tree of ``--images`` JPEG files (seeded, about ImageNet's mean size, 500 x 375, unless
``--dir`` names one) is read as training batches of ``--batch`` samples with ``rrc-flip`` augmentation at
``--size``, by two contenders with the same number of loader processes:

- ``zerowire``: ``worker.data.stream.StreamingImages`` as a worker reads it (its plan, reading ahead);
- ``dataloader``: a plain ``torch.utils.data.DataLoader`` (``num_workers`` processes, persistent, the default
  prefetch) over a map-style dataset that opens each file with Pillow and applies the same transform.

Both decode with the same code (``worker.data.decode``), so the figure is the pipeline's. Each contender runs
alone in its own process per round (rounds interleaved, the order rotating), starts its loader processes and
reads one unmeasured batch, then ``--batches`` measured ones. ``images_per_s`` is per loader process (the
median over rounds); ``ratios["zerowire/dataloader"]``.

Memory (``--memory``): a worker's peak RSS (``ru_maxrss``) after indexing and reading a few batches of a tree
of 2,000 and of 20,000 small images, each in a fresh process: what grows with the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONTENDERS = ("zerowire", "dataloader")
MEMORY_TREES = (2_000, 20_000)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "data", help="the image loader against a plain DataLoader; memory against dataset size"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--dir", default=None, help="an image folder (DIR/train/<class>/*); default: a generated one"
    )
    p.add_argument("--images", type=int, default=384, help="JPEG files of the generated tree (default 384)")
    p.add_argument("--size", type=int, default=224, help="samples are S x S (default 224)")
    p.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    p.add_argument("--batches", type=int, default=8, help="measured batches per round (default 8)")
    p.add_argument("--processes", type=int, default=2, help="loader processes of each contender (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--memory", action="store_true", help="peak RSS on trees of 2,000 and 20,000 images instead"
    )
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # one run, in its own process
    p.add_argument("--tree", type=int, default=None, help=argparse.SUPPRESS)  # one memory run
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from zerowire.commands import CommandError

    if min(args.images, args.size, args.batch, args.batches, args.processes, args.rounds) < 1:
        raise CommandError("--images, --size, --batch, --batches, --processes and --rounds must be >= 1")
    if args.contender is not None:  # a child: one contender's run
        print(json.dumps(_run_contender(args)))
        return 0
    if args.tree is not None:
        print(json.dumps(_memory_child(args)))
        return 0
    report = _memory(args) if args.memory else _speed(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if key not in ("rounds", "runs"):
                print(f"{key}: {value}")
    return 0


# -- speed -----------------------------------------------------------------------------------------------
def make_tree(root: Path, images: int, seed: int = 0, width: int = 500, height: int = 375) -> Path:
    """``images`` JPEG files over 4 classes under ``root/train``: smooth random colour fields (JPEG compresses
    them as it does photographs, unlike white noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "bench", "data", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench data {' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-data-") as tmp:
        root = Path(args.dir) if args.dir else make_tree(Path(tmp), args.images)
        common = ["--dir", str(root), "--size", str(args.size), "--batch", str(args.batch)]
        common += ["--batches", str(args.batches), "--processes", str(args.processes)]
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = CONTENDERS[r % 2 :] + CONTENDERS[: r % 2]
            for kind in order:
                runs.append({"round": r, **_child(args, [*common, "--contender", kind])})
    per_process = {
        k: statistics.median(run["images_per_s"] for run in runs if run["contender"] == k) / args.processes
        for k in CONTENDERS
    }
    return {
        "images": args.images if not args.dir else None,
        "dir": args.dir,
        "size": args.size,
        "augment": "rrc-flip",
        "batch": args.batch,
        "batches": args.batches,
        "processes": args.processes,
        "rounds": args.rounds,
        "images_per_s": per_process,  # per loader process
        "ratios": {"zerowire/dataloader": per_process["zerowire"] / per_process["dataloader"]},
        "runs": runs,
    }


def _run_contender(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worker.data import GlobalBatchSampler, load_dataset
    from worker.data.imagefolder import ImageOptions

    torch.set_num_threads(1)
    root = Path(args.dir)
    options = ImageOptions(size=args.size, augment="rrc-flip", val_fraction=0.1, loaders=args.processes)
    data = load_dataset(f"imagefolder:{root}", None, 0, options)
    sampler = GlobalBatchSampler(data.train_size, args.batch, 0)
    total = args.batches + 1  # the first is not measured
    if args.contender == "zerowire":

        def plan(step: int) -> tuple[torch.Tensor, int]:
            return sampler.indices(step), 0

        data.follow(plan)
        shape = tuple(data.train_batch(sampler.indices(0), 0, 0)[0].shape)
        started = time.perf_counter()
        for step in range(1, total):
            shape = tuple(data.train_batch(sampler.indices(step), step, 0)[0].shape)
        elapsed = time.perf_counter() - started
        data.close()
    else:
        from zerowire.bench.data_loader import plain_loader

        loader = plain_loader(data, sampler, total, args.processes)
        batches = iter(loader)
        shape = tuple(next(batches)[0].shape)
        started = time.perf_counter()
        for x, _ in batches:
            shape = tuple(x.shape)
        elapsed = time.perf_counter() - started
    assert shape == (args.batch, data.in_channels, args.size, args.size), shape
    return {
        "contender": args.contender,
        "images_per_s": args.batches * args.batch / elapsed,
        "seconds": elapsed,
    }


# -- memory ----------------------------------------------------------------------------------------------
def _memory(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-data-") as tmp:
        peaks = {}
        for n in MEMORY_TREES:
            root = Path(tmp) / str(n)
            _small_tree(root, n)
            peaks[str(n)] = _child(args, ["--dir", str(root), "--tree", str(n), "--processes", "1"])[
                "peak_rss_bytes"
            ]
    small, large = (peaks[str(n)] for n in MEMORY_TREES)
    return {"peak_rss_bytes": peaks, "difference_bytes": large - small, "images": list(MEMORY_TREES)}


def _small_tree(root: Path, images: int) -> None:
    """``images`` 16 x 16 PNG files over 10 classes (written once; a file of its bytes each)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        blobs.append(buf.getvalue())
    for i in range(images):
        folder = root / "train" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(blobs[i % len(blobs)])


def _memory_child(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from worker.data import GlobalBatchSampler, load_dataset
    from worker.data.imagefolder import ImageOptions

    data = load_dataset(f"imagefolder:{args.dir}", None, 0, ImageOptions(size=16, loaders=args.processes))
    sampler = GlobalBatchSampler(data.train_size, 64, 0)
    data.follow(lambda step: (sampler.indices(step), 0))
    for step in range(8):
        x, _ = data.train_batch(sampler.indices(step), step, 0)
    assert isinstance(x, torch.Tensor)
    data.close()
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "images": args.tree}
