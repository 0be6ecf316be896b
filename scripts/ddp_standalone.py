"""Plain DDP (gloo) step time on CPU, outside any benchmark harness: a reference for `zerowire bench step`.

Starts ``--workers`` processes of a minimal torch loop (the project's model, a fixed random batch per rank,
cross-entropy, SGD with momentum), one thread each and the product's worker malloc settings, and prints rank
0's median step time after ``--warmup`` unmeasured steps. Deliberately shares no code with the benchmark:

    python scripts/ddp_standalone.py --model resnet18 --workers 2 --batch 16 --steps 20 --json
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
import time

from zerowire.localcluster import WORKER_MALLOC_ENV


def rank_main(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from worker.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.workers
    )  # fmt: skip
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_model(a.model, 10, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(a.rank)
        x, y = torch.randn(a.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
        dist.barrier()
        times = []
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        if a.rank == 0:
            print(json.dumps({"step_times_s": times, "torch_threads": torch.get_num_threads()}), flush=True)
    finally:
        dist.destroy_process_group()


def launch(a: argparse.Namespace) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key, value in WORKER_MALLOC_ENV.items():
        env.setdefault(key, value)
    common = ["--model", a.model, "--workers", str(a.workers), "--batch", str(a.batch)]
    common += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--port", str(port)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *common, "--rank", str(rank)],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
        )
        for rank in range(a.workers)
    ]
    try:
        out, _ = procs[0].communicate(timeout=a.timeout)
        deadline = time.monotonic() + 60
        for proc in procs[1:]:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    if any(proc.returncode != 0 for proc in procs):
        print(f"ddp_standalone: a rank failed: {[p.returncode for p in procs]}", file=sys.stderr)
        return 1
    report = json.loads(out)
    median = statistics.median(report["step_times_s"])
    result = {
        "model": a.model,
        "workers": a.workers,
        "batch_per_worker": a.batch,
        "steps": a.steps,
        "median_step_s": median,
        "step_times_s": report["step_times_s"],
        "torch_threads": report["torch_threads"],
        "process_env": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *WORKER_MALLOC_ENV)},
    }
    text = f"ddp-gloo standalone median step {median * 1000:.1f} ms"
    print(json.dumps(result, indent=2) if a.json else text)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per worker")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first steps")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if min(a.workers, a.batch, a.steps) < 1 or a.warmup < 0:
        p.error("--workers, --batch and --steps must be >= 1, --warmup >= 0")
    if a.rank is not None:
        rank_main(a)
        return 0
    return launch(a)


if __name__ == "__main__":
    code = main()
    # Everything is closed and written: skip the interpreter's teardown, where torch.distributed's native
    # threads can abort the process (SIGABRT) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
