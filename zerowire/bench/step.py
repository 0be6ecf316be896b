"""`zerowire bench step`: training-step time of zerowire (ZeRO-3 over gRPC) against torch FSDP2 and DDP.

CIFAR ResNet-18, ``--workers`` processes x ``--batch`` samples of 3x32x32, one thread each, fp32, SGD with
momentum. Every contender runs as real processes on this machine in the same invocation:

- ``zerowire``: the product's Trainer over GrpcBackend (127.0.0.1), optionally int8 on the wire;
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every unit (stem, each block, head) and the root, gloo;
- ``ddp``: ``DistributedDataParallel``, gloo;
- ``floor``: one process, one batch, forward + backward + optimizer (no communication).

All contenders start first; then they run in turns (``--rounds`` chunks of the ``--steps`` measured steps
each, the order rotating every round) while the others sleep, so load drifts of the machine hit each alike.
Reported: median step time (rank 0, after the warm-up steps) of each, and ratios. ``--memory`` instead
prints per-worker persistent bytes of ZeRO-3 vs DDP at 2 and 4 workers and the measured peak of full
parameters held at once. Only the standard library is imported at module level; this module is also the
entry point of the benchmark's worker processes (``python -m zerowire.bench.step --worker ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zerowire.commands import CommandError

CONTENDERS = ("fsdp2", "ddp")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("step", help="training-step time: zerowire vs FSDP2 vs DDP (CIFAR ResNet-18)")
    p.add_argument("--vs", default="fsdp2,ddp", help="comma list of contenders: fsdp2, ddp (default both)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compression", choices=("none", "int8"), default="none", help="zerowire wire codec")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first steps (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="turns per contender, steps split among them")
    p.add_argument("--workers", type=int, default=2, help="processes per contender (default 2)")
    p.add_argument("--batch", type=int, default=16, help="samples per worker (default 16)")
    p.add_argument("--model", default="resnet18", help="model name (default resnet18)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per contender")
    p.add_argument("--memory", action="store_true", help="print the memory figures instead of timings")
    p.set_defaults(handler=handle)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Contender:
    """The processes of one contender, sharing the turn file of the run."""

    def __init__(self, kind: str, world: int, root: Path, args: argparse.Namespace, chunk: int) -> None:
        self.kind = kind
        self.world = world
        self.dir = root / kind
        self.dir.mkdir()
        ports = ",".join(str(_free_port()) for _ in range(world))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        for rank in range(world):
            cmd = [
                sys.executable, "-m", "zerowire.bench.step", "--worker", kind, "--rank", str(rank),
                "--world", str(world), "--ports", ports, "--dir", str(self.dir), "--turn-file",
                str(root / "turn"), "--chunk", str(chunk), "--rounds", str(args.rounds), "--warmup",
                str(args.warmup), "--batch", str(args.batch), "--model", args.model,
                "--compression", args.compression,
            ]  # fmt: skip
            with open(self.dir / f"stderr-{rank}", "wb") as err:
                self.procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stderr=err))

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                tail = (self.dir / f"stderr-{rank}").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"{self.kind}: rank {rank} failed:\n{tail}")

    def wait_files(self, name: str, deadline: float) -> None:
        while not all((self.dir / f"{name}-{r}").exists() for r in range(self.world)):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: timed out waiting for {name}")
            time.sleep(0.005)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _set_turn(root: Path, value: str) -> None:
    tmp = root / "turn.tmp"
    tmp.write_text(value)
    os.replace(tmp, root / "turn")


def _measure(kinds: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start every contender, then let them run ``--rounds`` chunks of steps in turns, rotating the order
    each round, so slow drifts of the machine's load hit every contender alike."""
    chunk = -(-args.steps // args.rounds)
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-") as tmp:
        root = Path(tmp)
        _set_turn(root, "start")
        contenders: list[_Contender] = []
        try:
            for kind in kinds:
                contenders.append(_Contender(kind, 1 if kind == "floor" else args.workers, root, args, chunk))
            deadline = time.monotonic() + args.timeout
            for c in contenders:
                c.wait_files("ready", deadline)
            for rnd in range(args.rounds):
                for i in range(len(contenders)):
                    c = contenders[(i + rnd) % len(contenders)]
                    _set_turn(root, f"{c.kind} {rnd}")
                    c.wait_files(f"done{rnd}", deadline)
            _set_turn(root, "exit")
            for c in contenders:
                c.wait_files("report", deadline)
            return {c.kind: json.loads((c.dir / "report-0").read_text()) for c in contenders}
        finally:
            for c in contenders:
                c.kill()


def handle(args: argparse.Namespace) -> int:
    if args.memory:
        from zerowire.bench.step_memory import memory_table

        table = memory_table(args.model)
        if args.json:
            print(json.dumps(table, indent=2))
        else:
            mib = 2**20
            for row in table["rows"]:
                print(
                    f"N={int(row['world_size'])}: zero3 persistent "
                    f"{row['zero3_persistent_bytes'] / mib:8.2f} "
                    f"MiB/worker vs DDP {row['ddp_persistent_bytes'] / mib:8.2f} MiB "
                    f"({row['ratio_vs_ddp']:.3f}x); peak full params measured "
                    f"{row['measured_peak_full_bytes'] / mib:6.2f} MiB "
                    f"(bound {row['full_param_bound_bytes'] / mib:6.2f} MiB)"
                )
        return 0
    vs = [v.strip() for v in args.vs.split(",") if v.strip()]
    unknown = [v for v in vs if v not in CONTENDERS]
    if unknown or min(args.steps, args.rounds, args.workers, args.batch) < 1 or args.warmup < 0:
        msg = f"unknown contenders {unknown} (known: {', '.join(CONTENDERS)})" if unknown else "bad counts"
        raise CommandError(msg)
    results = _measure(["zerowire", *vs, "floor"], args)
    medians = {k: statistics.median(r["step_times_s"]) for k, r in results.items()}
    ratios = {f"zerowire/{k}": medians["zerowire"] / medians[k] for k in medians if k != "zerowire"}
    ratios.update({f"{k}/floor": medians[k] / medians["floor"] for k in medians if k != "floor"})
    out = {
        "model": args.model,
        "workers": args.workers,
        "batch_per_worker": args.batch,
        "compression": args.compression,
        "steps": args.steps,
        "median_step_s": medians,
        "ratios": ratios,
        "zerowire_wait_s_median": statistics.median(results["zerowire"]["wait_times_s"]),
        "zerowire_wire_bytes_sent": results["zerowire"].get("bytes_sent", 0),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in medians.items():
            print(f"{k:9s} median step {v * 1000:8.1f} ms")
        for k, v in ratios.items():
            print(f"{k:16s} {v:6.3f}x")
    return 0


# -- worker processes ---------------------------------------------------------------------------------
def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerowire.bench.step worker")
    p.add_argument("--worker", choices=("zerowire", "fsdp2", "ddp", "floor"), required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ports", required=True)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--turn-file", type=Path, required=True)
    p.add_argument("--chunk", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--compression", default="none")
    a = p.parse_args(argv)
    from zerowire.bench import step_workers

    report = step_workers.run(a)
    out = a.dir / f"report-{a.rank}"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
