"""The `zerowire` front: every command is registered, and building the parser stays light (no torch,
no grpc), so `zerowire status` and `--help` answer at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zerowire.cli import COMMAND_MODULES, build_parser


def test_every_command_and_benchmark_is_registered() -> None:
    parser = build_parser()
    for name in COMMAND_MODULES:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
    for bench in ("coordinator", "comm", "step"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["bench", bench, "--help"])
        assert exc.value.code == 0


def test_building_the_parser_imports_neither_torch_nor_grpc() -> None:
    code = (
        "import sys; from zerowire.cli import build_parser; build_parser(); "
        "heavy = sorted(m for m in ('torch', 'grpc', 'numpy', 'cryptography') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_zerowire_run_prints_the_page_with_the_token_in_its_fragment() -> None:
    from urllib.parse import unquote, urlsplit

    from zerowire.commands.run_driver import page_url

    url = page_url("http://127.0.0.1:8765", "a+b/c=d&e")
    parts = urlsplit(url)
    assert (parts.path, parts.query) == ("/", "")  # never in the request line the browser sends
    assert parts.fragment.startswith("token=") and unquote(parts.fragment[len("token=") :]) == "a+b/c=d&e"
    assert "+" not in parts.fragment  # a fragment parser would read it as a space
