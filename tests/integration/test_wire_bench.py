"""`zerowire bench comm --json` runs end to end (small tensor) and reports every ratio with its goal."""

from __future__ import annotations

import argparse
import json

import pytest

from zerowire.bench import comm


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_bench_comm_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    comm.add_parser(parser.add_subparsers())
    argv = ["comm", "--json", "--size-mb", "4", "--repeats", "2", "--timeout", "80", "--stat", "median"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ratios"]) == set(comm.GOALS)
    for info in report["ratios"].values():
        assert info["value"] > 0 and isinstance(info["met"], bool)
    assert report["all_gather_exact"] and report["reduce_scatter_exact"]
    assert report["ratios"]["int8_wire_ratio"]["value"] <= 0.26
    assert report["tensor_bytes"] == 4_000_000
    assert report["ratio_statistic"] == "median"
    for key, best in report["seconds_best"].items():
        assert 0 < best <= report["seconds_median"][key] == report["seconds"][key]
