"""`zerowire bench {coordinator,comm,step,faults}`: each benchmark lives in zerowire/bench/<name>.py and
exposes `add_parser(subparsers)` (standard-library imports only at top level)."""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("coordinator", "comm", "step", "faults", "data")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("bench", help="benchmarks: coordinator, comm, step, faults, data")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHES:
        importlib.import_module(f"zerowire.bench.{name}").add_parser(benches)
