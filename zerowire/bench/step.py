"""`zerowire bench step`: training-step time of zerowire (ZeRO-3 over gRPC) against torch FSDP2 and DDP.

CIFAR ResNet-18, ``--workers`` processes x ``--batch`` samples of 3x32x32, one thread each, fp32, SGD with
momentum. Every contender runs as real processes on this machine in the same invocation:

- ``zerowire``: the product's Trainer over GrpcBackend (127.0.0.1), optionally int8 on the wire;
- with ``--colocated`` it runs as two contenders instead: ``zerowire_local``, the product's data plane for
  workers that share a host (HierarchicalBackend: every member on one host id, so the torch.distributed
  lane on the rank's device: gloo on CPU, NCCL with ``--device cuda``), and ``zerowire_grpc``, the flat
  gRPC path between the same co-located processes; ``--nccl-reduce`` picks the local lane's
  reduce-scatter (``ordered``, the default, or ``native``), and ``both`` runs ``zerowire_local_native``
  (NCCL's own reduce-scatter) beside ``zerowire_local`` and reports ``zerowire_local_native/zerowire_local``;
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every unit (stem, each block, head) and the root, gloo;
- ``ddp``: ``DistributedDataParallel``, gloo;
- ``floor``: one process, one batch, forward + backward + optimizer (no communication).

The ``--steps`` measured steps are split over ``--rounds`` interleaved rounds; in each round every contender
runs alone in fresh processes (``--warmup`` unmeasured steps, then its share of the measured ones), the
order rotating every round (see ``step_rounds``). Every process gets the same thread count and malloc
settings (reported as ``process_env``). zerowire's jobs keep no buddy replica unless ``--replicas 1``: the
other contenders cannot survive a lost worker and pay nothing for it; ``--replicas both`` runs
``zerowire_replicated`` beside ``zerowire`` and reports ``zerowire_replicated/zerowire``. zerowire's ranks
trace every call through the flight recorder, as workers do; ``--recorder both`` runs ``zerowire_unrecorded``
(the same ranks without it) beside ``zerowire`` and reports ``zerowire/zerowire_unrecorded``, the recorder's
cost. Reported: the
median over all rounds of rank 0's measured step times of each contender, per-round medians, and ratios.
``--memory`` instead measures the peak tensor bytes per rank of zerowire (with and without a replica),
DDP and FSDP2 at 2 and 4 workers (see ``step_memory``). Only the standard library is imported at module
level; this module is also the entry point of the benchmark's worker processes
(``python -m zerowire.bench.step --worker ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zerowire.commands import CommandError

if TYPE_CHECKING:
    from zerowire.bench.step_rounds import Run

CONTENDERS = ("fsdp2", "ddp")
REPLICATED = "zerowire_replicated"  # zerowire with a buddy replica (--replicas both)
UNRECORDED = "zerowire_unrecorded"  # zerowire without the flight recorder (--recorder both)
NATIVE = "zerowire_local_native"  # the local lane with NCCL's own reduce-scatter (--nccl-reduce both)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("step", help="training-step time: zerowire vs FSDP2 vs DDP (CIFAR ResNet-18)")
    p.add_argument("--vs", default="fsdp2,ddp", help="comma list of contenders: fsdp2, ddp (default both)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compression", choices=("none", "int8"), default="none", help="zerowire wire codec")
    p.add_argument(
        "--replicas",
        choices=("0", "1", "both"),
        default="0",
        help="zerowire buddy replicas (default 0, as FSDP2 and DDP keep none; 1 adds the cost of losing a "
        "worker without losing a step; both: zerowire and zerowire_replicated side by side, with the ratio "
        "zerowire_replicated/zerowire)",
    )
    p.add_argument(
        "--recorder",
        choices=("on", "off", "both"),
        default="on",
        help="zerowire's flight recorder (default on, as in a worker; both: also run zerowire without it "
        "and report the recorder's cost)",
    )
    p.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first steps of every run (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds, steps split among them")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes per contender (default 2; with --memory: 2 and 4, or only this many)",
    )
    p.add_argument("--batch", type=int, default=16, help="samples per worker (default 16)")
    p.add_argument("--model", default="resnet18", help="model name (default resnet18)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run of a contender")
    p.add_argument("--memory", action="store_true", help="measure peak tensor bytes per rank instead")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where every contender trains (cuda: rank r on GPU r mod the visible GPUs; NCCL for DDP and "
        "FSDP2 where each rank has a GPU of its own, gloo otherwise)",
    )
    p.add_argument(
        "--colocated",
        action="store_true",
        help="workers sharing one host: zerowire over its local torch.distributed lane (zerowire_local) "
        "and over flat gRPC (zerowire_grpc)",
    )
    p.add_argument(
        "--nccl-reduce",
        choices=("ordered", "native", "both"),
        default="ordered",
        help="with --colocated: the local lane's reduce-scatter over NCCL, ordered (default: rank-order "
        "sums) or native (NCCL's); both: zerowire_local_native beside zerowire_local, with their ratio",
    )
    p.set_defaults(handler=handle)


def _summary(kinds: list[str], runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    """The JSON report from the runs, in the order they happened."""
    from zerowire.bench.step_rounds import TORCH_THREADS, process_env

    def rank0(kind: str, key: str) -> list[list[float]]:
        return [r.reports[0][key] for r in runs if r.contender == kind]

    medians = {k: statistics.median(t for chunk in rank0(k, "step_times_s") for t in chunk) for k in kinds}
    ours = [k for k in kinds if k.startswith("zerowire")]
    ratios = {f"{z}/{k}": medians[z] / medians[k] for z in ours for k in medians if k not in ours}
    ratios.update({f"{k}/floor": medians[k] / medians["floor"] for k in medians if k != "floor"})
    if REPLICATED in medians:  # what surviving a lost worker costs, against the same run's zerowire
        ratios[f"{REPLICATED}/zerowire"] = medians[REPLICATED] / medians["zerowire"]
    if UNRECORDED in medians:  # what the flight recorder costs, against the same run's zerowire
        ratios[f"zerowire/{UNRECORDED}"] = medians["zerowire"] / medians[UNRECORDED]
    if NATIVE in medians:  # NCCL's own reduce-scatter against the rank-order one, same rounds
        ratios[f"{NATIVE}/zerowire_local"] = medians[NATIVE] / medians["zerowire_local"]
    zw = [r for r in runs if r.contender == ours[0]]
    lanes = {
        z: {
            lane: sum(r.reports[0].get("bytes_by_lane", {}).get(lane, 0) for r in runs if r.contender == z)
            for lane in ("grpc", "local")
        }
        for z in ours
    }
    return {
        "model": args.model,
        "device": args.device,
        "workers": args.workers,
        "batch_per_worker": args.batch,
        "compression": args.compression,
        "replicas": "both" if REPLICATED in medians else args.replicas,
        "recorder": getattr(args, "recorder", "on"),
        "steps": args.steps,
        "median_step_s": medians,
        "ratios": ratios,
        "colocated": bool(getattr(args, "colocated", False)),
        "nccl_reduce": getattr(args, "nccl_reduce", "ordered"),
        "zerowire_wait_s_median": statistics.median(t for c in rank0(ours[0], "wait_times_s") for t in c),
        # rank 0's bytes over all its runs, every run's warm-up steps included
        "zerowire_wire_bytes_sent": sum(r.reports[0].get("bytes_sent", 0) for r in zw),
        "bytes_by_lane": lanes,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "round_medians_s": {k: [statistics.median(c) for c in rank0(k, "step_times_s")] for k in kinds},
        "process_env": process_env(),
        "torch_num_threads": TORCH_THREADS,
        "runs": [r.as_dict() for r in runs],
    }


def handle(args: argparse.Namespace) -> int:
    worlds = None if args.workers is None else (args.workers,)  # --memory: the world sizes measured
    args.workers = 2 if args.workers is None else args.workers
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: CUDA is not available on this machine")
        if args.colocated and torch.cuda.device_count() < args.workers:
            raise CommandError("--colocated --device cuda needs a GPU per worker (the local lane is NCCL)")
    if args.memory:
        from zerowire.bench.step_memory import measured_memory, print_memory

        if args.batch < 1 or args.workers < 1:
            raise CommandError("bad counts")
        args.memory_worlds = worlds
        with tempfile.TemporaryDirectory(prefix="zerowire-bench-") as tmp:
            try:
                table = measured_memory(args, Path(tmp))
            except RuntimeError as exc:
                raise CommandError(str(exc), code=1) from exc
        if args.json:
            print(json.dumps(table, indent=2))
        else:
            print_memory(table)
        return 0
    vs = [v.strip() for v in args.vs.split(",") if v.strip()]
    unknown = [v for v in vs if v not in CONTENDERS]
    if unknown or min(args.steps, args.rounds, args.workers, args.batch) < 1 or args.warmup < 0:
        msg = f"unknown contenders {unknown} (known: {', '.join(CONTENDERS)})" if unknown else "bad counts"
        raise CommandError(msg)
    if args.rounds > args.steps:
        raise CommandError(f"--rounds ({args.rounds}) must not exceed --steps ({args.steps})")
    from zerowire.bench.step_rounds import measure

    both = args.replicas == "both"
    if both and args.colocated:
        raise CommandError("--replicas both measures the default zerowire contender; leave out --colocated")
    if args.nccl_reduce != "ordered" and not args.colocated:
        raise CommandError("--nccl-reduce is the local lane's: it needs --colocated")
    args.replicas = 0 if both else int(args.replicas)
    if getattr(args, "recorder", "on") == "both" and args.colocated:
        raise CommandError("--recorder both measures the default zerowire contender; leave out --colocated")
    ours = ["zerowire_local", "zerowire_grpc"] if args.colocated else ["zerowire"]
    if both:
        ours.append(REPLICATED)
    if getattr(args, "recorder", "on") == "both":
        ours.append(UNRECORDED)
    if args.nccl_reduce == "both":
        ours.insert(1, NATIVE)
    kinds = [*ours, *vs, "floor"]
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-") as tmp:
        try:
            runs = measure(kinds, args, Path(tmp))
        except RuntimeError as exc:  # a contender failed or timed out (its log's tail is in the message)
            raise CommandError(str(exc), code=1) from exc
    out = _summary(kinds, runs, args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out["median_step_s"].items():
            rounds = " ".join(f"{m * 1000:.0f}" for m in out["round_medians_s"][k])
            print(f"{k:14s} median step {v * 1000:8.1f} ms   (rounds: {rounds} ms)")
        for k, v in out["ratios"].items():
            print(f"{k:24s} {v:6.3f}x")
        env = " ".join(f"{k}={v}" for k, v in out["process_env"].items())
        print(f"{args.rounds} rounds, fresh processes per contender and round; {env}")
    return 0


# -- worker processes ---------------------------------------------------------------------------------
def _worker_main(argv: list[str], started_s: float) -> int:
    p = argparse.ArgumentParser(prog="zerowire.bench.step worker")
    p.add_argument(
        "--worker",
        choices=("zerowire", "zerowire_local", "zerowire_grpc", "fsdp2", "ddp", "floor"),
        required=True,
    )
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ports", required=True)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--compression", default="none")
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--recorder", choices=("on", "off"), default="on")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nccl-reduce", choices=("ordered", "native"), default="ordered")
    a = p.parse_args(argv)
    from zerowire.bench import step_workers

    report = step_workers.run(a)
    report.update(start_s=started_s, exit_s=time.time())  # wall clock, comparable across processes
    out = a.dir / f"report-{a.rank}"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    from zerowire.process_exit import exit_without_teardown

    exit_without_teardown(_worker_main(sys.argv[1:], started_s=time.time()))
