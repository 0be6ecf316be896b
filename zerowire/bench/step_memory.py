"""Memory figures of `zerowire bench step --memory`.

Measured (``peak_bytes_per_rank``): every contender (zerowire over gRPC, DDP and FSDP2 over gloo) runs alone
in fresh processes through the same harness as the timings (``step_rounds``), ``MEMORY_WARMUP`` warm-up
step(s) then ``MEMORY_STEPS`` measured ones, at 2 and 4 workers (or the ``--workers`` given); each rank
reports the peak tensor bytes of its measured steps (``step_peak``); the figure of a contender is the
largest over its ranks. zerowire runs twice: ``zerowire`` without a replica, as FSDP2 and DDP keep none, and
``zerowire_replicated`` with its default job's buddy replica (the ward's parameter and momentum shards: the
price of losing a worker without losing a step); ``--replicas`` does not apply here.

From the plan (``plan``): per-worker persistent bytes of ZeRO-3 vs DDP from the partition plan, and the peak
of full parameters the engine held at once in one training step (ranks as threads over the in-process
backend, so that figure is the engine's own accounting)."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
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


MEMORY_WORLDS = (2, 4)
# zerowire as FSDP2 and DDP run (no replica), and with the buddy replica of its default job (replicas 1)
MEMORY_CONTENDERS = ("zerowire", "zerowire_replicated", "ddp", "fsdp2")
_REPLICAS = {"zerowire": 0, "zerowire_replicated": 1}
MEMORY_WARMUP = 1
MEMORY_STEPS = 2


def measured_memory(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Peak tensor bytes per rank of every contender at every world size (``MEMORY_WORLDS``, or only
    ``args.memory_worlds`` when given), ratios, and the plan figures."""
    from zerowire.bench.step_rounds import process_env, run_contender

    worlds = tuple(getattr(args, "memory_worlds", None) or MEMORY_WORLDS)
    peaks: dict[str, dict[str, int]] = {}
    by_rank: dict[str, dict[str, list[int]]] = {}
    for world in worlds:
        a = argparse.Namespace(**{**vars(args), "workers": world, "warmup": MEMORY_WARMUP, "memory": True})
        sub = root / str(world)
        sub.mkdir()
        runs = [
            run_contender(
                "zerowire" if kind in _REPLICAS else kind,
                0,
                MEMORY_STEPS,
                sub,
                argparse.Namespace(**{**vars(a), "replicas": _REPLICAS.get(kind, 0)}),
                label=kind,
            )
            for kind in MEMORY_CONTENDERS
        ]
        by_rank[str(world)] = {r.contender: [int(rep["peak_bytes"]) for rep in r.reports] for r in runs}
        peaks[str(world)] = {k: max(v) for k, v in by_rank[str(world)].items()}
    ratios = {
        w: {f"{z}/{k}": p[z] / p[k] for z in _REPLICAS for k in MEMORY_CONTENDERS if k not in _REPLICAS}
        for w, p in peaks.items()
    }
    return {
        "model": args.model,
        "batch_per_worker": args.batch,
        "input": "3x32x32",
        "warmup": MEMORY_WARMUP,
        "steps": MEMORY_STEPS,
        "device": getattr(args, "device", "cpu"),
        "measure": "torch.cuda.max_memory_allocated"
        if getattr(args, "device", "cpu") == "cuda"
        else "peak bytes of live tensors on the training thread (torch profiler allocator events)",
        "peak_bytes_per_rank": peaks,
        "ratios": ratios,
        "peak_bytes_by_rank": by_rank,
        "process_env": process_env(),
        "plan": memory_table(args.model, worlds),
    }


def print_memory(table: dict[str, Any]) -> None:
    mib = 2**20
    for world, peaks in table["peak_bytes_per_rank"].items():
        figures = "  ".join(f"{k} {v / mib:8.2f} MiB" for k, v in peaks.items())
        ratios = "  ".join(f"{k} {v:.3f}x" for k, v in table["ratios"][world].items())
        print(f"N={world}: peak per rank  {figures}   ({ratios})")
    for row in table["plan"]["rows"]:
        print(
            f"N={int(row['world_size'])}: plan: zero3 persistent {row['zero3_persistent_bytes'] / mib:8.2f} "
            f"MiB/worker vs DDP {row['ddp_persistent_bytes'] / mib:8.2f} MiB ({row['ratio_vs_ddp']:.3f}x)"
        )
