"""`zerowire status --coordinator URL [--watch] [--json]`: a readable table of the cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from zerowire.commands import CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="show the cluster: state, epoch, workers")
    p.add_argument(
        "--coordinator",
        default=os.environ.get("ZEROWIRE_COORDINATOR", "http://127.0.0.1:8765"),
        help="coordinator URL (default $ZEROWIRE_COORDINATOR or http://127.0.0.1:8765)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("ZEROWIRE_READ_TOKEN"),
        help="the coordinator's read-only (or admin) token ($ZEROWIRE_READ_TOKEN); the cluster token "
        "does not read status",
    )
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval of --watch (seconds)")
    p.add_argument("--json", action="store_true", help="print the raw JSON of /cluster/status")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="who holds the job up and why (/cluster/diagnosis): one sentence, or its JSON with --json",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("ZEROWIRE_TLS_CA") or None,
        metavar="PEM",
        help="CA that signed an HTTPS coordinator's certificate ($ZEROWIRE_TLS_CA; default: system roots)",
    )
    p.set_defaults(handler=handle)


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec or ".3g")
    return str(value)


def render(status: dict[str, Any]) -> str:
    job = status.get("job") or {}
    head = (
        f"cluster {status.get('state', '?')}  epoch {status.get('epoch', '?')}  world size "
        f"{status.get('world_size', '?')}  step {status.get('step', '?')}/{job.get('steps', '?')}  "
        f"job {job.get('job_id', '?')} ({job.get('model', '?')} on {job.get('dataset', '?')})  "
        f"uptime {_fmt(status.get('uptime_s'), '.0f')}s"
    )
    columns = (
        "WORKER",
        "RANK",
        "STATE",
        "PHASE",
        "AGE",
        "STEP",
        "LOSS",
        "ACC",
        "SAMPLES/S",
        "SENT",
        "LOCAL",
        "HOST",
        "ADDRESS",
        "DEVICE",
    )
    rows = [columns]
    for w in sorted(status.get("workers", []), key=lambda w: (w.get("rank") is None, w.get("rank") or 0)):
        rows.append(
            (
                str(w.get("worker_id")),
                _fmt(w.get("rank")),
                str(w.get("state")),
                _fmt(w.get("worker_state")),
                _fmt(w.get("last_heartbeat_age_s"), ".1f") + "s",
                _fmt(w.get("step")),
                _fmt(w.get("loss"), ".4f"),
                "-" if w.get("test_accuracy") is None else f"{100 * float(w['test_accuracy']):.1f}%",
                _fmt(w.get("samples_per_s"), ".0f"),
                _human(w.get("bytes_sent")),
                _human((w.get("bytes_by_lane") or {}).get("local")),
                _fmt(w.get("host_id")),
                f"{w.get('host')}:{w.get('port')}",
                _fmt(w.get("device")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = [head, ""] + ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no workers)")
    return "\n".join(lines)


def render_diagnosis(found: dict[str, Any]) -> str:
    """The diagnosis's sentence, then one line per suspect."""
    lines = [str(found.get("summary", ""))]
    for s in found.get("suspects", []):
        lines.append(
            f"  suspect {s.get('worker_id')} (rank {s.get('rank')}, host {s.get('host')}): {s.get('reason')}"
        )
    return "\n".join(lines)


def _human(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return "-"


def handle(args: argparse.Namespace) -> int:
    from communication.tls import client_ssl_context
    from worker.coordinator_client import CoordinatorError, SyncCoordinatorClient

    try:
        verify = client_ssl_context(args.tls_ca)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    with SyncCoordinatorClient(args.coordinator, args.token, verify=verify) as client:
        while True:
            try:
                status = client.diagnosis() if args.diagnose else client.cluster_status()
            except CoordinatorError as exc:
                raise CommandError(str(exc)) from None
            if args.diagnose and not args.json:
                print(render_diagnosis(status), flush=True)
            elif args.json:
                print(json.dumps(status, indent=None if args.watch else 2), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render(status), flush=True)
            if not args.watch:
                return 0
            try:
                time.sleep(max(0.1, args.interval))
            except KeyboardInterrupt:
                return 0
