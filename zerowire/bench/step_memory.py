"""Memory figures of `zerowire bench step --memory`: per-worker persistent bytes of ZeRO-3 vs DDP from the
partition plan, and the peak of full parameters the engine held at once in one real training step (ranks
as threads over the in-process backend, so the figure is the engine's own accounting, not the wire's)."""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from communication.group import PeerGroup
from communication.testing import FakeHub
from worker.models import build_model
from worker.zero3.memory import memory_figures
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule


def measured_peak(model_name: str, world: int, batch: int = 2) -> int:
    """Max over ranks of the full-parameter bytes held at once during one forward + backward."""
    hub = FakeHub(world)
    peaks = [0] * world
    errors: list[BaseException] = []
    lock = threading.Lock()

    def rank_main(rank: int) -> None:
        try:
            with lock:
                torch.manual_seed(0)
                model = build_model(model_name, 10, 3)
            group = PeerGroup("mem", 0, rank, tuple(f"127.0.0.1:{1 + r}" for r in range(world)))
            engine = ShardedModule(model, group, hub.backend(rank), timeout=120.0)
            g = torch.Generator().manual_seed(rank)
            x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
            engine.begin(0)
            F.cross_entropy(engine(x), y, reduction="sum").backward()
            engine.finish_backward()
            peaks[rank] = engine.peak_full_bytes
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return max(peaks)


def memory_table(model_name: str, worlds: tuple[int, ...] = (2, 4)) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = build_model(model_name, 10, 3)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    rows = []
    for world in worlds:
        fig = memory_figures(plan_model(model, world), "sgd", 0.9, buffer_bytes)
        row = fig.as_dict()
        row["measured_peak_full_bytes"] = float(measured_peak(model_name, world))
        rows.append(row)
    return {"model": model_name, "optimizer": "sgd momentum", "rows": rows}
