"""The recovery report travels as exact int64 values: steps and layouts past 2**24 (where float32, the
old carrier, rounds) and the squared gradient norm of the newest decision, bit for bit."""

from __future__ import annotations

import math

import torch

from worker import recovery
from worker.recovery import NONE, StateReport, choose, settle_values


def test_a_report_round_trips_exactly_through_int64() -> None:
    big = 2**24 + 1  # float32 holds 2**24 + 1 as 2**24
    report = StateReport(
        cur_layout=big + 2,
        cur_confirmed=1,
        cur_done=big,
        cur_staged=big,
        prev_layout=big + 1,
        prev_done=big - 1,
        last_step=big - 1,
        last_skip=0,
        last_total_sq=math.nextafter(1 / 3, 1.0),  # a float whose every bit matters
        opt_steps=2**40 + 3,
    )
    values = report.values()
    assert values.dtype == torch.int64 and values.numel() == len(StateReport.__dataclass_fields__)
    assert StateReport.parse(values) == report
    assert StateReport.parse(StateReport().values()) == StateReport()
    assert float(torch.tensor(float(big), dtype=torch.float32)) != big  # what the old carrier lost


def test_the_choice_sees_steps_past_float32_precision() -> None:
    step = 2**24 + 1
    ahead = StateReport(cur_layout=7, cur_confirmed=1, cur_done=step, last_step=step - 1, last_total_sq=2.5)
    behind = StateReport(cur_layout=7, cur_confirmed=1, cur_done=step - 1, cur_staged=step - 1)
    reports = [StateReport.parse(r.values()) for r in (ahead, behind, StateReport())]
    choice = choose(reports)
    assert choice.layout == 7 and choice.step == step
    assert choice.which == ("cur", "catchup", "") and choice.settle == (step - 1, False, 2.5)
    assert choose([StateReport()]).layout == NONE


def test_settle_values_are_int64_flags() -> None:
    assert settle_values(lost=True, holder=False).tolist() == [0, 1]
    assert settle_values(lost=False, holder=True).dtype == torch.int64
    assert recovery.settle_values(False, False).tolist() == [0, 0]
