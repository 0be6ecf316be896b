"""`zerowire bench comm`: the wire between 2 processes on loopback.

Measured in the same run, on a float32 tensor of --size-mb (ResNet-18's 44.7 MB by default):
zerowire all_gather and reduce_scatter vs torch.distributed gloo all_gather_into_tensor and
reduce_scatter_tensor, vs the torch.distributed lane (communication/torchdist.py, gloo), and vs the same
bytes over bare gRPC (zerowire/bench/comm_bare.py: our chunk
size and channel options, none of our framing, checksums or accumulator); one-way tensor stream
throughput vs a raw TCP socket; the int8 codec's speed on one thread and its wire bytes. Each ratio is
printed with its goal. Every contender is timed alike: one warm-up, then --repeats interleaved rounds
(one call of each per round, each call after a barrier), the slower rank's time per call. The two peers
are child processes of this command (`python -m zerowire.bench.comm --peer RANK DIR ...`).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zerowire.commands import CommandError

GOALS = {
    "all_gather_vs_gloo": ("<=", 0.6),
    "reduce_scatter_vs_gloo": ("<=", 0.6),
    "stream_vs_tcp": (">=", 0.6),
    "all_gather/bare_grpc": ("<=", 1.5),
    "reduce_scatter/bare_grpc": ("<=", 1.5),
    "int8_codec_gb_per_s": (">=", 2.0),
    "int8_wire_ratio": ("<=", 0.26),
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("comm", help="wire throughput vs gloo and raw TCP (2 processes on loopback)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--size-mb", type=float, default=44.7, help="float32 tensor size in MB (default 44.7)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repetitions per measurement (default 5)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="overall limit in seconds")
    parser.add_argument(
        "--stat",
        choices=("best", "median"),
        default="best",
        help="which of the repeats the ratios use (default best: least disturbed by other load)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also time our all_gather and reduce_scatter over mutual TLS (the cost of TLS on the wire)",
    )
    parser.set_defaults(handler=run)


def _wait_for(path: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit:.0f}s")
        time.sleep(0.01)


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def run(args: argparse.Namespace) -> int:
    if args.size_mb <= 0 or args.repeats < 1:
        raise CommandError("--size-mb must be > 0 and --repeats >= 1")
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-") as tmp:
        directory = Path(tmp)
        cmd = [sys.executable, "-m", "zerowire.bench.comm", "--peer"]
        token = os.urandom(16).hex()
        if args.tls:
            from zerowire.certs import make_loopback_certs

            make_loopback_certs(directory / "tls")
        procs = [
            subprocess.Popen(
                [*cmd, str(r), tmp, str(args.size_mb), str(args.repeats), "tls" if args.tls else "plain"],
                start_new_session=True,
                env={**os.environ, "ZEROWIRE_BENCH_TOKEN": token},
            )
            for r in range(2)
        ]
        try:
            deadline = time.monotonic() + args.timeout
            for proc in procs:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise CommandError(f"bench peer failed with exit code {rc}", 1)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        peers = [json.loads((directory / f"result.{r}.json").read_text()) for r in range(2)]
    report = _report(args.size_mb, peers, args.stat)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'':32s} {'best':>9s}    {'median':>9s}")
        for key in report["seconds"]:
            best, median = report["seconds_best"][key], report["seconds_median"][key]
            print(f"{key:32s} {best * 1000:9.2f} ms {median * 1000:9.2f} ms")
        for key, value in report["throughput_gb_per_s"].items():
            print(f"{key:32s} {value:9.3f} GB/s")
        print(
            f"{'load average (1 min)':32s} {report['load_average_1m']:9.2f}  on {report['cpu_count']} cores"
        )
        print(f"ratios from the {report['ratio_statistic']} of {args.repeats} repeats")
        for key, info in report["ratios"].items():
            verdict = "ok" if info["met"] else "MISSED"
            print(f"{key:32s} {info['value']:9.3f}  goal {info['goal']}  {verdict}")
    return 0


def _report(size_mb: float, peers: list[dict[str, Any]], stat: str = "best") -> dict[str, Any]:
    # repeat i of a collective takes as long as its slower rank (the ranks start each repeat together)
    per_repeat = {
        k: [max(ts) for ts in zip(*(p["seconds"][k] for p in peers), strict=True)]
        for k in peers[0]["seconds"]
    }
    medians = {k: statistics.median(v) for k, v in per_repeat.items()}
    bests = {k: min(v) for k, v in per_repeat.items()}
    seconds = bests if stat == "best" else medians
    int8 = peers[0]["int8"]
    nbytes = peers[0]["bytes"]
    tput = {
        "raw_tcp_one_way": nbytes / seconds["raw_tcp_one_way"] / 1e9,
        "zerowire_stream_one_way": nbytes / seconds["zerowire_stream_one_way"] / 1e9,
        "int8_codec_one_thread": int8[f"gb_per_s_{stat}"],
    }
    values = {
        "all_gather_vs_gloo": seconds["zerowire_all_gather"] / seconds["gloo_all_gather_into_tensor"],
        "reduce_scatter_vs_gloo": seconds["zerowire_reduce_scatter"] / seconds["gloo_reduce_scatter_tensor"],
        "stream_vs_tcp": tput["zerowire_stream_one_way"] / tput["raw_tcp_one_way"],
        "all_gather/bare_grpc": seconds["zerowire_all_gather"] / seconds["bare_grpc_all_gather"],
        "reduce_scatter/bare_grpc": seconds["zerowire_reduce_scatter"] / seconds["bare_grpc_reduce_scatter"],
        "int8_codec_gb_per_s": tput["int8_codec_one_thread"],
        "int8_wire_ratio": int8["wire_ratio"],
    }
    ratios = {}
    for key, value in values.items():
        op, goal = GOALS[key]
        met = value <= goal if op == "<=" else value >= goal
        ratios[key] = {"value": round(value, 4), "goal": f"{op} {goal}", "met": met}
    tls_cost = {
        f"{op}_tls/plaintext": seconds[f"zerowire_{op}_tls"] / seconds[f"zerowire_{op}"]
        for op in ("all_gather", "reduce_scatter")
        if f"zerowire_{op}_tls" in seconds
    }
    return {
        "size_mb": size_mb,
        "tensor_bytes": nbytes,
        "processes": 2,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "int8_rel_err": round(int8["rel_err"], 5),
        "ratio_statistic": stat,
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "seconds_median": {k: round(v, 5) for k, v in medians.items()},
        "seconds_best": {k: round(v, 5) for k, v in bests.items()},
        "throughput_gb_per_s": {k: round(v, 3) for k, v in tput.items()},
        "ratios": ratios,
        **({"tls_cost": {k: round(v, 4) for k, v in tls_cost.items()}} if tls_cost else {}),
        "all_gather_exact": all(p["checks"]["all_gather_exact"] for p in peers),
        "reduce_scatter_exact": all(p["checks"]["reduce_scatter_exact"] for p in peers),
        "bare_grpc_exact": all(p["checks"]["bare_grpc_exact"] for p in peers),
        "torchdist_exact": all(p["checks"]["torchdist_exact"] for p in peers),
    }


def _peer(rank: int, directory: Path, size_mb: float, repeats: int, tls: bool = False) -> None:
    """One of the two bench processes (heavy imports here only)."""
    import socket
    import warnings

    import torch
    import torch.distributed as dist

    from communication.compression import Int8Codec
    from communication.group import PeerGroup
    from communication.grpc_backend import GrpcBackend
    from communication.tls import TlsConfig
    from communication.torchdist import TorchDistBackend
    from zerowire.bench.comm_bare import BareGrpc

    warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
    numel = int(size_mb * 1e6) // 4 // 2 * 2
    half = numel // 2
    nbytes = numel * 4
    backend = GrpcBackend(os.environ["ZEROWIRE_BENCH_TOKEN"])
    port = backend.start("127.0.0.1:0")
    bare = BareGrpc(timeout=120)
    bare_port = bare.start("127.0.0.1:0")
    secure: GrpcBackend | None = None
    secure_port = 0
    if tls:
        certs = directory / "tls"
        config = TlsConfig.load(certs / "localhost.pem", certs / "localhost.key", certs / "ca.pem")
        secure = GrpcBackend(os.environ["ZEROWIRE_BENCH_TOKEN"], tls=config)
        secure_port = secure.start("127.0.0.1:0")
    listener = socket.create_server(("127.0.0.1", 0))
    gloo_port = lane_port = 0
    if rank == 0:
        with socket.socket() as probe, socket.socket() as probe2:
            probe.bind(("127.0.0.1", 0))
            probe2.bind(("127.0.0.1", 0))
            gloo_port, lane_port = probe.getsockname()[1], probe2.getsockname()[1]
    _write(
        directory / f"port.{rank}",
        [port, listener.getsockname()[1], gloo_port, bare_port, secure_port, lane_port],
    )
    for r in range(2):
        _wait_for(directory / f"port.{r}", 120)
    ports = [json.loads((directory / f"port.{r}").read_text()) for r in range(2)]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[0][2]}", rank=rank, world_size=2, timeout=_td(120)
    )
    dist.barrier()
    group = PeerGroup("bench", 1, rank, tuple(f"127.0.0.1:{p[0]}" for p in ports))
    backend.set_group(group)
    lane = TorchDistBackend(collective_timeout=120, rendezvous_timeout=120)
    lane.set_group(group, f"127.0.0.1:{ports[0][5]}")
    secure_group = PeerGroup("bench", 1, rank, tuple(f"localhost:{p[4]}" for p in ports))
    if secure is not None:
        secure.set_group(secure_group)
    gen = torch.Generator().manual_seed(rank)
    shard = torch.randn(half, generator=gen)
    full = torch.randn(numel, generator=gen)
    out = torch.empty(numel)
    red = torch.empty(half)
    step = [0]
    other = 1 - rank

    def zw_gather() -> None:
        step[0] += 1
        backend.all_gather(group, step[0], 0, shard, out, 120).result(150)
        backend.release(group, step[0])

    def zw_reduce() -> None:
        step[0] += 1
        backend.reduce_scatter(group, step[0], 1, full, red, 120).result(150)
        backend.release(group, step[0])

    tls_out = torch.empty(numel)
    tls_red = torch.empty(half)

    def tls_gather() -> None:
        assert secure is not None
        step[0] += 1
        secure.all_gather(secure_group, step[0], 0, shard, tls_out, 120).result(150)
        secure.release(secure_group, step[0])

    def tls_reduce() -> None:
        assert secure is not None
        step[0] += 1
        secure.reduce_scatter(secure_group, step[0], 1, full, tls_red, 120).result(150)
        secure.release(secure_group, step[0])

    bare_out = torch.zeros(numel)
    bare_red = torch.empty(half)
    bare_send = full[other * half : (other + 1) * half]
    bare.connect(f"127.0.0.1:{ports[other][3]}", shard, bare_red)
    gloo_out = torch.empty(numel)
    gloo_red = torch.empty(half)
    lane_out = torch.empty(numel)
    lane_red = torch.empty(half)

    # one-way: rank 1 streams `big` to rank 0, once over zerowire, once over a raw TCP socket
    big = torch.randn(numel, generator=gen)
    recv = torch.empty(numel)

    def zw_stream() -> None:
        step[0] += 1
        if rank == 1:
            backend.publish(group, step[0], 2, big)
        else:
            backend.fetch(group, step[0], 2, 1, recv, 120).result(150)
        dist.barrier()  # the sender's time is the receiver's
        backend.release(group, step[0])

    conn: socket.socket
    if rank == 0:
        conn, _ = listener.accept()
    else:
        conn = socket.create_connection(("127.0.0.1", ports[0][1]))
    view = recv.view(torch.uint8).numpy().data
    src = big.view(torch.uint8).numpy().data

    def tcp_stream() -> None:
        if rank == 1:
            conn.sendall(src)
        else:
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:], nbytes - got)
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
        dist.barrier()

    contenders: dict[str, Callable[[], object]] = {
        "zerowire_all_gather": zw_gather,
        "bare_grpc_all_gather": lambda: bare.all_gather(bare_out[other * half : (other + 1) * half]),
        "gloo_all_gather_into_tensor": lambda: dist.all_gather_into_tensor(gloo_out, shard),
        "zerowire_reduce_scatter": zw_reduce,
        "bare_grpc_reduce_scatter": lambda: bare.reduce_scatter(bare_send),
        "gloo_reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(gloo_red, full),
        "torchdist_all_gather": lambda: lane.all_gather(group, 0, 0, shard, lane_out, 120).result(150),
        "torchdist_reduce_scatter": lambda: lane.reduce_scatter(group, 0, 1, full, lane_red, 120).result(150),
        "zerowire_stream_one_way": zw_stream,
        "raw_tcp_one_way": tcp_stream,
    }
    if secure is not None:
        contenders.update({"zerowire_all_gather_tls": tls_gather, "zerowire_reduce_scatter_tls": tls_reduce})
    # every contender alike: one warm-up, then `repeats` interleaved rounds, each call after a barrier
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        dist.barrier()
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    conn.close()
    listener.close()
    bare.close()
    peer_half = slice(other * half, (other + 1) * half)
    checks = {
        "all_gather_exact": bool(torch.equal(out, gloo_out)),
        "reduce_scatter_exact": bool(torch.allclose(red, gloo_red, rtol=1e-6, atol=1e-6)),
        "bare_grpc_exact": bool(torch.equal(bare_out[peer_half], gloo_out[peer_half])),
        "torchdist_exact": bool(torch.equal(lane_out, out) and torch.equal(lane_red, red)),
    }
    lane.close()
    if secure is not None:
        checks["all_gather_exact"] &= bool(torch.equal(tls_out, gloo_out))
        checks["reduce_scatter_exact"] &= bool(torch.equal(tls_red, red))
        secure.close()

    int8: dict[str, float] = {}
    if rank == 0:  # alone, while the other rank waits at the barrier
        torch.set_num_threads(1)
        codec = Int8Codec()
        payload = torch.empty(codec.payload_bytes(numel, torch.float32, 1024), dtype=torch.uint8)
        decoded = torch.empty(numel)
        codec.encode_into(full, 1024, payload)
        codec.decode_into(payload, 1024, decoded)
        samples = []
        for _ in range(max(3, repeats)):
            start = time.perf_counter()
            codec.encode_into(full, 1024, payload)
            codec.decode_into(payload, 1024, decoded)
            samples.append(time.perf_counter() - start)
        int8 = {
            "gb_per_s_median": nbytes / statistics.median(samples) / 1e9,
            "gb_per_s_best": nbytes / min(samples) / 1e9,
            "wire_ratio": payload.numel() / nbytes,
            "rel_err": float((decoded - full).norm() / full.norm()),
        }
    dist.barrier()
    backend.close()
    dist.destroy_process_group()
    _write(
        directory / f"result.{rank}.json",
        {"seconds": seconds, "bytes": nbytes, "checks": checks, "int8": int8},
    )


def _td(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--peer":
        _peer(int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "tls")
        sys.exit(0)
    print("usage: zerowire bench comm [--json] [--size-mb MB] [--repeats N]", file=sys.stderr)
    sys.exit(2)
