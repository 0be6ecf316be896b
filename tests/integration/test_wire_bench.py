"""`zerowire bench comm --json` runs end to end (small tensor) and reports every ratio with its goal,
the bare-gRPC contender's among them, and with --tls the cost of mutual TLS on the same collectives."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from zerowire.bench import comm


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_comm_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    comm.add_parser(parser.add_subparsers())
    argv = [
        "comm",
        "--json",
        "--size-mb",
        "4",
        "--repeats",
        "2",
        "--timeout",
        "40",
        "--stat",
        "median",
        "--tls",
    ]
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
    # the bare-gRPC contender: its times and ours divided by them, positive and finite
    assert report["bare_grpc_exact"]
    for op in ("all_gather", "reduce_scatter"):
        bare = report["seconds"][f"bare_grpc_{op}"]
        ratio = report["ratios"][f"{op}/bare_grpc"]["value"]
        assert math.isfinite(bare) and bare > 0 and math.isfinite(ratio) and ratio > 0
        # ours / bare (times are rounded to 10 us in the report, the ratio is not)
        ours = report["seconds"][f"zerowire_{op}"]
        assert ratio == pytest.approx(ours / bare, abs=1e-5 * (ours + bare) / bare**2 + 1e-4)
    # --tls: the same collectives over mutual TLS, exact, and their time over plaintext's
    for op in ("all_gather", "reduce_scatter"):
        tls = report["seconds"][f"zerowire_{op}_tls"]
        assert report["tls_cost"][f"{op}_tls/plaintext"] == pytest.approx(
            tls / report["seconds"][f"zerowire_{op}"], rel=0.01
        )
