"""The `zerowire` command: a thin front. Each subcommand lives in zerowire/commands/<name>.py and
exposes `add_parser(subparsers)` that sets `handler`; a handler's CommandError becomes one line on
stderr and its exit code. Command modules import only the standard
library at top level (heavy imports go inside handlers), so `zerowire status` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from zerowire.commands import CommandError

COMMAND_MODULES = ("coordinator", "worker", "run", "status", "bench", "certs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerowire", description="ZeRO-3 sharded training over the wire")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"zerowire.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc: int = args.handler(args)
    except CommandError as exc:
        prog = " ".join(x for x in ("zerowire", args.command, getattr(args, "bench", None)) if x)
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return exc.code
    return rc


if __name__ == "__main__":
    sys.exit(main())
