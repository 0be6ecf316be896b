"""A dataset streamed from its files (``imagefolder:DIR``): decoded by a pool of loader processes, a few steps
ahead of the training, never held whole.

The trainer asks for a step's micro-batch (``train_batch(indices, step, offset)``) and tells the dataset how
to find the micro-batch of any later step (``follow(plan)``: the same world-size-independent global batches,
this rank's slice). After each batch the next ``window`` steps' batches are queued on the pool (bounded
prefetch); a batch asked for that is not queued is decoded at once. A new epoch (a failover or a join) brings
a new plan from the first uncommitted step, and what was queued for the old one and does not match is
dropped: no sample is lost or repeated.

Every sample is keyed by ``(seed, step, position in the global batch)`` (``worker.data.decode``), so a batch
is bit-identical whatever the number of loader processes and workers. The loader processes are started
once (``spawn``: fresh interpreters that import Pillow and numpy, not torch, and share no lock with the
worker's threads), live as long as the dataset (``close``), and die with their worker, even a SIGKILLed one
(``worker.data.decode.loader_init``).

A file that cannot be decoded stops the step with an error naming it (``bad_images = "fail"``), or is left
out of its micro-batch and counted (``"skip"``). Waiting on a decode is bounded (``DECODE_TIMEOUT_S``) and
the time the step loop spends blocked on the loader is reported (``take_wait``: the step's ``data_wait_s``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.data.dataset import Plan
from worker.data.decode import BadImage, Sample, Transform, decode_many, loader_init
from worker.data.imagefolder import ImageIndex, ImageOptions, describe, normalisation

log = logging.getLogger(__name__)

DECODE_TIMEOUT_S = 120.0  # one chunk of a batch; a hung decoder fails the step instead of hanging it
PREFETCH_STEPS = 2


class _Inline(Executor):
    """Decoding on the calling thread (no loader process): futures resolved at submit."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


@dataclass
class _Queued:
    indices: torch.Tensor
    chunks: list[Future[tuple[np.ndarray, list[str]]]]


class StreamingImages:
    """The train and test splits of an :class:`ImageIndex`, decoded on demand (see the module docstring)."""

    def __init__(self, idx: ImageIndex, options: ImageOptions, seed: int) -> None:
        self.index = idx
        self.options = options
        self.name = f"imagefolder:{idx.root}"
        self.num_classes = len(idx.classes)
        self.in_channels = idx.channels
        self.train_size = len(idx.train)
        self.test_size = len(idx.test)
        self.transform = Transform(options.size, idx.channels, options.augment, seed)
        self.mean, self.std = normalisation(idx, self.transform, seed)
        # x / 255 standardised is x * scale - shift, in two passes over the batch
        std = torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1)
        self._shift = (torch.tensor(self.mean, dtype=torch.float64) / std).float().view(1, -1, 1, 1)
        self._labels_train = torch.tensor([label for _, label in idx.train], dtype=torch.int64)
        self._labels_test = torch.tensor([label for _, label in idx.test], dtype=torch.int64)
        self._pool: Executor | None = None
        self._queued: dict[tuple[int, int], _Queued] = {}
        self._plan: Plan | None = None
        self.window = PREFETCH_STEPS
        self.pin_memory = False
        self.skipped = 0
        self._wait_s = 0.0

    # -- the dataset the trainer reads -------------------------------------------------------------------
    def follow(self, plan: Plan | None, pin_memory: bool = False) -> None:
        """The micro-batch of each later step (a new epoch's plan); queued batches of another plan go."""
        self._plan = plan
        self.pin_memory = pin_memory
        if plan is None:
            self._drop(lambda key: True)

    def train_batch(
        self, indices: torch.Tensor, step: int, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised inputs (float32, N x C x S x S) and labels of the training samples ``indices``, at
        positions ``offset ...`` of the global batch of ``step``."""
        queued = self._queued.pop((step, offset), None)
        if queued is None or not torch.equal(queued.indices, indices):
            queued = self._submit(indices, step, offset)
        x, keep = self._gather(queued, [self.index.train[int(i)][0] for i in indices])
        y = self._labels_train[indices][keep]
        self._drop(lambda key: key[0] <= step)  # a rank's earlier steps are over
        self._prefetch(step)
        return x, y

    def test_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [self.index.test[int(i)][0] for i in indices]
        queued = _Queued(indices, self._chunks([Sample(p, None) for p in paths]))
        x, keep = self._gather(queued, paths)
        return x, self._labels_test[indices][keep]

    def take_wait(self) -> float:
        """Seconds the step loop waited on the loader since the last call."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def describe(self) -> dict[str, Any]:
        return {**describe(self.index, self.mean, self.std), "bad_images_skipped": self.skipped}

    def close(self) -> None:
        self._drop(lambda key: True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- internals ---------------------------------------------------------------------------------------
    def _executor(self) -> Executor:
        if self._pool is None:
            if self.options.loaders <= 0:
                self._pool = _Inline()
            else:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.options.loaders,
                    mp_context=multiprocessing.get_context("spawn"),  # fresh: no lock of the worker's threads
                    initializer=loader_init,
                    initargs=(os.getpid(),),
                )
        return self._pool

    def _chunks(self, samples: list[Sample]) -> list[Future[tuple[np.ndarray, list[str]]]]:
        parts = max(1, self.options.loaders)
        per = -(-len(samples) // parts) if samples else 1
        pool = self._executor()
        return [
            pool.submit(decode_many, self.transform, samples[i : i + per])
            for i in range(0, len(samples), per)
        ]

    def _submit(self, indices: torch.Tensor, step: int, offset: int) -> _Queued:
        samples = [Sample(self.index.train[int(i)][0], (step, offset + k)) for k, i in enumerate(indices)]
        return _Queued(indices, self._chunks(samples))

    def _prefetch(self, step: int) -> None:
        if self._plan is None:
            return
        for ahead in range(step + 1, step + 1 + self.window):
            indices, offset = self._plan(ahead)
            if (ahead, offset) not in self._queued and len(indices):
                self._queued[(ahead, offset)] = self._submit(indices, ahead, offset)

    def _gather(self, queued: _Queued, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        arrays: list[np.ndarray] = []
        errors: list[str] = []
        try:
            for fut in queued.chunks:
                arr, errs = fut.result(timeout=DECODE_TIMEOUT_S)
                arrays.append(arr)
                errors += errs
        except TimeoutError:
            raise BadImage(
                f"{self.name}: decoding {len(paths)} images took over {DECODE_TIMEOUT_S:g} s"
            ) from None
        finally:
            self._wait_s += time.perf_counter() - started
        keep = torch.tensor([not e for e in errors], dtype=torch.bool)
        bad = [e for e in errors if e]
        if bad:
            if self.options.bad_images != "skip":
                raise BadImage(bad[0] + " (--bad-images skip leaves such files out)")
            self.skipped += len(bad)
            log.warning("%s: skipped %d file(s) that cannot be decoded: %s", self.name, len(bad), bad[0])
        raw = torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        if bad:
            raw = raw[keep]
        x = raw.to(torch.float32).mul_(self._scale).sub_(self._shift)
        return (x.pin_memory() if self.pin_memory else x), keep

    def _drop(self, which: Callable[[tuple[int, int]], bool]) -> None:
        for key in [k for k in self._queued if which(k)]:
            for fut in self._queued.pop(key).chunks:
                fut.cancel()
