"""An invalid job is refused in one line that names the flag and what it allows, from the CLI and from the
Python API alike; defaults that depend on other flags adapt to them (the warm-up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobspec import InvalidJob, JobSpec, make_job
from zerowire.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": 0}, "--steps must be an integer >= 1 and <= 10000000 (got 0)"),
        ({"steps": "many"}, "--steps must be an integer >= 1 and <= 10000000 (got 'many')"),
        ({"lr": 0}, "--lr must be a number > 0.0 and <= 100.0 (got 0)"),
        ({"momentum": 1.0}, "--momentum must be a number >= 0.0 and < 1.0 (got 1.0)"),
        ({"optimizer": "adam"}, "--optimizer must be 'sgd' or 'adamw' (got 'adam')"),
        ({"nesterov": "maybe"}, "--nesterov must be true or false (got 'maybe')"),
        ({"job_id": "a b"}, "--job-id may hold only letters, digits, '.', '_' and '-' (got 'a b')"),
        ({"job_id": ""}, "--job-id must be 1 to 128 characters long (got 0)"),
        ({"betas": (0.9, 0.99, 0.5)}, "--betas must be two numbers B1,B2"),
        ({"learning_rate": 0.1}, "--learning-rate: no such job option"),
        ({"steps": 4, "warmup_steps": 10}, "--warmup-steps (10) exceeds --steps (4)"),
    ],
)
def test_each_invalid_job_names_its_flag_and_range_in_one_line(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidJob) as refused:
        make_job(values)
    text = str(refused.value)
    assert message in text and text.startswith("invalid job: ")
    assert "\n" not in text and "pydantic" not in text and "http" not in text


def test_two_faults_are_both_named() -> None:
    with pytest.raises(InvalidJob, match=r"--steps .*; --lr "):
        make_job({"steps": -1, "lr": -1})


def test_the_warm_up_adapts_to_the_steps_unless_given() -> None:
    assert make_job({}).warmup_steps == 10 == JobSpec().warmup_steps  # 300 steps
    assert make_job({"steps": 4}).warmup_steps == 0
    assert make_job({"steps": 50}).warmup_steps == 5
    assert make_job({"steps": 5000}).warmup_steps == 10
    assert make_job({"steps": 300, "warmup_steps": 40}).warmup_steps == 40  # given: kept
    assert make_job({"steps": 4, "warmup_steps": 4}).warmup_steps == 4
    # the resolved value is part of the job, so every worker hashes the same spec
    assert make_job({"steps": 4}).hash == make_job({"steps": 4, "warmup_steps": 0}).hash


def test_the_cli_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--steps", "0", "--workers", "1", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "zerowire run: invalid job: --steps must be an integer >= 1 and <= 10000000 (got 0)"
    assert not (tmp_path / "o").exists()  # nothing was started
