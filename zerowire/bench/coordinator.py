"""`zerowire bench coordinator`: a real coordinator process under N simulated workers heartbeating at RATE Hz.

Reports heartbeat latency (p50/p99, measured by the client, so it includes the client's own overhead),
false evictions (workers declared dead although they kept heartbeating), and detection latency: the time
from one worker's last acknowledged heartbeat until /cluster/status shows it dead.
Simulated workers heartbeat with their own secrets, like real ones; registration rate limits are off.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from zerowire.bench.http_callers import HttpxCaller, RawHttp
from zerowire.commands import CommandError

REPORT = (
    "workers {workers} at {rate_hz} Hz for {duration_s} s (+ warm-up); client: {client}\n"
    "registering all workers took {register_all_s:.2f} s; heartbeats meanwhile: {flood_heartbeats}, "
    "p50 {flood_latency_p50_ms:.2f} ms  p99 {flood_latency_p99_ms:.2f} ms\n"
    "heartbeats measured: {heartbeats} ({heartbeat_errors} errors), {achieved_hz:.1f} per second\n"
    "heartbeat latency p50 {latency_p50_ms:.2f} ms  p99 {latency_p99_ms:.2f} ms  "
    "max {latency_max_ms:.2f} ms\n"
    "  server-side (histogram bucket bounds, whole run): p50 <= {server_latency_p50_ms:g} ms  "
    "p99 <= {server_latency_p99_ms:g} ms\n"
    "  CPU while measured: coordinator {server_cpu_share:.0%} of a core, simulated workers "
    "{client_cpu_share:.0%}; load average {loadavg_1m:.1f} on {cpu_count} CPUs; a busy loop got "
    "{busy_loop_cpu_share_before:.0%} of a core just before the run\n"
    "false evictions: {false_evictions} (the simulator's own loop sent a due heartbeat up to "
    "{max_client_lateness_s:.2f} s late)\n"
    "detection latency: {detection_latency_s:.3f} s (heartbeat timeout {timeout:g} s)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("coordinator", help="heartbeat latency, false evictions and detection latency")
    p.add_argument("--workers", type=int, default=1000, help="simulated workers (default 1000)")
    p.add_argument("--rate", type=float, default=1.0, help="heartbeats per second per worker (default 1)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds after warm-up (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default 3)")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0, help="the coordinator's (default 2)")
    p.add_argument("--status-poll", type=float, default=0.1, help="seconds between /cluster/status polls")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="simulated workers' HTTP client: raw keep-alive HTTP/1.1 over asyncio streams (default; "
        "cheap, so the figures measure the coordinator) or httpx.AsyncClient (its CPU cost may dominate)",
    )
    conn_help = "keep-alive connections shared by the simulated workers (default 0: one per worker)"
    p.add_argument("--connections", type=int, default=0, help=conn_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _next_slot(t_next: float, period: float) -> float:
    """The next send time on the worker's own schedule; slots missed while waiting are skipped, not
    sent in a burst (a real worker's heartbeat loop never catches up)."""
    now = time.monotonic()
    t_next += period
    if t_next <= now:
        t_next += ((now - t_next) // period + 1) * period
    return t_next


def _cpu_probe(seconds: float = 1.0) -> float:
    """The share of one core a busy loop gets right now: context for figures taken on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        pass
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _server_histogram(text: str, route: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of the coordinator's own request-latency histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "zerowire_request_latency_seconds_bucket" and s.labels.get("route") == route:
                buckets.append((float(s.labels["le"]), s.value))
    return sorted(buckets)


def _hist_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile q (a conservative estimate)."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    target = q * buckets[-1][1]
    return next(le for le, count in buckets if count >= target)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would swamp the output

    if args.workers < 2 or args.rate <= 0 or args.duration <= 0:
        raise CommandError("need --workers >= 2, --rate > 0, --duration > 0")
    if 1.0 / args.rate >= args.heartbeat_timeout:
        raise CommandError("1/rate must be shorter than --heartbeat-timeout")
    probe = _cpu_probe()
    port = _free_port()
    token, read_token = secrets.token_hex(16), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="zerowire-bench-") as tmp:
        cmd = [
            sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "coordinator",
            "--host", "127.0.0.1", "--port", str(port), "--db", os.path.join(tmp, "bench.db"),
            "--max-workers", str(args.workers + 8), "--heartbeat-interval", str(min(0.5, 0.5 / args.rate)),
            "--heartbeat-timeout", str(args.heartbeat_timeout),
            "--register-rate", "0", "--register-rate-global", "0",
        ]  # fmt: skip
        env = dict(os.environ, ZEROWIRE_TOKEN=token, ZEROWIRE_READ_TOKEN=read_token)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            result = asyncio.run(_bench(args, f"http://127.0.0.1:{port}", (token, read_token), proc))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
    result["busy_loop_cpu_share_before"] = probe
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(REPORT.format(**result, timeout=args.heartbeat_timeout))
    ok = result["false_evictions"] == 0 and result["detection_latency_s"] == result["detection_latency_s"]
    return 0 if ok else 1


async def _bench(
    args: argparse.Namespace, base: str, tokens: tuple[str, str], proc: subprocess.Popen[bytes]
) -> dict[str, Any]:
    import asyncio
    import random

    import httpx

    token, read_token = tokens
    headers = {"Authorization": f"Bearer {read_token}"}
    n_conn = args.connections or args.workers
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30.0) as client:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {proc.returncode} before serving")
            try:
                if (await client.get("/healthz", timeout=2.0)).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("coordinator did not answer /healthz within 60 s")
            await asyncio.sleep(0.1)

        port = int(base.rsplit(":", 1)[1])
        callers: list[RawHttp | HttpxCaller]
        if args.client == "httpx":
            callers = [HttpxCaller(client)] * args.workers
        elif args.connections:
            callers = [RawHttp("127.0.0.1", port, n_conn)] * args.workers
        else:
            callers = [RawHttp("127.0.0.1", port, 1) for _ in range(args.workers)]
        ids = [f"bench-{i:05d}" for i in range(args.workers)]
        victim = ids[0]
        period = 1.0 / args.rate
        sem = asyncio.Semaphore(32)
        all_registered = asyncio.Event()
        registered = [0]
        clock: dict[str, float] = {}
        t_reg = time.monotonic()
        steady: list[float] = []
        during_flood: list[float] = []
        errors: list[str] = []
        evicted: set[str] = set()
        victim_last_ack = [0.0]
        client_late = [0.0]

        async def worker(wid: str, i: int) -> None:
            body = {"worker_id": wid, "host": "127.0.0.1", "port": 20000 + i, "host_id": f"h{i // 8}"}
            body["device"] = "cpu"
            caller = callers[i]
            async with sem:
                status, reply = await caller.request("POST", "/workers/register", token, body)
            if status != 201:
                raise RuntimeError(f"registering {wid}: HTTP {status} {reply}")
            epoch, secret = reply["epoch"], reply["worker_secret"]
            registered[0] += 1
            if registered[0] == len(ids):
                clock["registered"] = time.monotonic()
                clock["measure_from"] = clock["registered"] + args.warmup
                clock["end"] = clock["measure_from"] + args.duration
                clock["stop_victim"] = clock["measure_from"] + args.duration / 3
                all_registered.set()
            t_next = (
                time.monotonic() + random.random() * period
            )  # like a real worker: beat right after joining
            step = 0
            answered = time.monotonic()
            while True:
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))
                now = time.monotonic()
                # how long a due heartbeat waited for the simulator's own event loop (a starved client)
                client_late[0] = max(client_late[0], now - max(t_next, answered))
                if all_registered.is_set() and (
                    now >= clock["end"] or (wid == victim and now >= clock["stop_victim"])
                ):
                    return
                hb = {"epoch": epoch, "step": step, "state": "training", "loss": 1.0}
                t0 = time.perf_counter()
                try:
                    status, reply = await caller.request("POST", f"/workers/{wid}/heartbeat", secret, hb)
                except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                    errors.append(f"{wid}: {type(exc).__name__}")
                    t_next = _next_slot(t_next, period)
                    continue
                dt = time.perf_counter() - t0
                answered = time.monotonic()
                if status == 200:
                    epoch = reply["epoch"]
                    if wid == victim:
                        victim_last_ack[0] = time.monotonic()
                elif status == 410:
                    evicted.add(wid)
                    return
                else:
                    errors.append(f"{wid}: HTTP {status}")
                if not all_registered.is_set():
                    during_flood.append(dt)
                elif now >= clock["measure_from"]:
                    steady.append(dt)
                step += 1
                t_next = _next_slot(t_next, period)

        async def cpu_window() -> None:
            await all_registered.wait()
            await asyncio.sleep(max(0.0, clock["measure_from"] - time.monotonic()))
            cpu["server0"], cpu["client0"] = _proc_cpu_s(proc.pid), time.process_time()
            await asyncio.sleep(max(0.0, clock["end"] - time.monotonic()))
            cpu["server"] = _proc_cpu_s(proc.pid) - cpu["server0"]
            cpu["client"] = time.process_time() - cpu["client0"]

        async def detect() -> float:
            await all_registered.wait()
            await asyncio.sleep(max(0.0, clock["stop_victim"] - time.monotonic()))
            if victim in evicted:
                return float("nan")  # falsely evicted before the stop: nothing left to detect
            while time.monotonic() < clock["end"] + 30:
                status = (await client.get("/cluster/status")).json()
                row = next(w for w in status["workers"] if w["worker_id"] == victim)
                if row["state"] == "dead":
                    return time.monotonic() - victim_last_ack[0]
                await asyncio.sleep(args.status_poll)
            return float("nan")

        cpu: dict[str, float] = {}
        cpu_task = asyncio.create_task(cpu_window())
        detect_task = asyncio.create_task(detect())
        await asyncio.gather(*(worker(w, i) for i, w in enumerate(ids)))
        detection = await detect_task
        await cpu_task
        for c in set(callers):
            await c.close()

        died: set[str] = set()
        after = 0
        while True:
            page = (await client.get("/events", params={"after": after, "limit": 1000})).json()
            died |= {e["worker_id"] for e in page["events"] if e["kind"] == "died"}
            if not page["events"]:
                break
            after = page["last_id"]
        server_hist = _server_histogram((await client.get("/metrics")).text, "/workers/{worker_id}/heartbeat")
    false = (died | evicted) - {victim}
    return {
        "workers": args.workers,
        "rate_hz": args.rate,
        "duration_s": args.duration,
        "client": args.client,
        "register_all_s": round(clock["registered"] - t_reg, 3),
        "heartbeats": len(steady),
        "achieved_hz": len(steady) / args.duration,
        "heartbeat_errors": len(errors),
        "latency_p50_ms": _pct(steady, 0.50) * 1e3,
        "latency_p99_ms": _pct(steady, 0.99) * 1e3,
        "latency_max_ms": max(steady, default=float("nan")) * 1e3,
        "flood_heartbeats": len(during_flood),
        "flood_latency_p50_ms": _pct(during_flood, 0.50) * 1e3,
        "flood_latency_p99_ms": _pct(during_flood, 0.99) * 1e3,
        "server_latency_p50_ms": _hist_quantile(server_hist, 0.50) * 1e3,
        "server_latency_p99_ms": _hist_quantile(server_hist, 0.99) * 1e3,
        "server_cpu_share": cpu["server"] / args.duration,
        "client_cpu_share": cpu["client"] / args.duration,
        "false_evictions": len(false),
        "max_client_lateness_s": client_late[0],
        "victim_detected_dead": victim in died,
        "detection_latency_s": detection,
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "status_poll_s": args.status_poll,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
    }
