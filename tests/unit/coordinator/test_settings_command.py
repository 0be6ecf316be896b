"""Settings validation and the `zerowire coordinator` option parsing (no server started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from zerowire.cli import main
from zerowire.commands import coordinator as cmd


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["coordinator", *argv])


def test_timeouts_must_nest_with_a_clear_message() -> None:
    with pytest.raises(ValueError) as exc:
        CoordinatorSettings(token="t", heartbeat_interval=1.0, heartbeat_timeout=0.5)
    text = str(exc.value)
    assert "heartbeat interval (1 s) must be shorter than heartbeat timeout (0.5 s)" in text
    assert "required: heartbeat interval (1 s) < heartbeat timeout (0.5 s) < collective timeout" in text
    with pytest.raises(ValueError, match=r"startup timeout .* must be shorter than barrier timeout"):
        CoordinatorSettings(token="t", collective_timeout=700.0, startup_timeout=700.0)
    s = CoordinatorSettings(token="t")
    assert s.reaper_tick_s == 0.25 and s.grace_s == s.heartbeat_timeout


def test_the_startup_timeout_is_at_least_the_collective_timeout_and_below_the_barrier_timeout() -> None:
    s = CoordinatorSettings(token="t")
    assert (s.collective_timeout, s.startup_timeout, s.barrier_timeout) == (30.0, 120.0, 600.0)
    with pytest.raises(ValueError) as exc:
        CoordinatorSettings(token="t", collective_timeout=60.0, startup_timeout=59.0)
    text = str(exc.value)
    assert "collective timeout (60 s) must not be longer than startup timeout (59 s)" in text
    assert "collective timeout (60 s) <= startup timeout (59 s) < barrier timeout (600 s)" in text
    with pytest.raises(ValueError, match=r"startup timeout \(600 s\) must be shorter than barrier"):
        CoordinatorSettings(token="t", startup_timeout=600.0)
    assert CoordinatorSettings(token="t", startup_timeout=30.0).startup_timeout == 30.0  # equal is allowed
    with pytest.raises(ValueError, match="greater than 0"):
        CoordinatorSettings(token="t", startup_timeout=0.0)
    args = parse("--startup-timeout", "90", "--collective-timeout", "45")
    assert (args.startup_timeout, args.collective_timeout) == (90.0, 45.0)


def test_a_startup_timeout_below_the_collective_timeout_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "c.db")
    argv = [
        "coordinator",
        "--db",
        db,
        "--token",
        "t",
        "--collective-timeout",
        "40",
        "--startup-timeout",
        "20",
    ]
    assert main(argv) == 2
    assert (
        "collective timeout (40 s) must not be longer than startup timeout (20 s)" in capsys.readouterr().err
    )
    monkeypatch.setenv("ZEROWIRE_STARTUP_TIMEOUT", "10")  # the environment is checked the same way
    assert main(["coordinator", "--db", db, "--token", "t"]) == 2
    assert (
        "collective timeout (30 s) must not be longer than startup timeout (10 s)" in capsys.readouterr().err
    )
    assert not (tmp_path / "c.db").exists()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROWIRE_TOKEN", "from-env")
    monkeypatch.setenv("ZEROWIRE_HEARTBEAT_TIMEOUT", "3.5")
    monkeypatch.setenv("ZEROWIRE_MAX_WORKERS", "7")
    s = CoordinatorSettings()
    assert s.token is not None and s.token.get_secret_value() == "from-env"
    assert s.heartbeat_timeout == 3.5 and s.max_workers == 7
    assert CoordinatorSettings(max_workers=9).max_workers == 9  # explicit values win


def test_job_flags_map_onto_jobspec_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobspec import JobSpec

    job_file = tmp_path / "job.toml"
    job_file.write_text('[job]\njob_id = "from-file"\nsteps = 50\nmodel = "resnet18"\n')
    monkeypatch.setenv("ZEROWIRE_SEED", "7")
    args = parse(
        "--job", str(job_file), "--steps", "120", "--lr", "0.05", "--optimizer", "adamw",
        "--betas", "0.8,0.99", "--compression", "int8", "--global-batch", "32", "--nesterov", "true",
    )  # fmt: skip
    values = cmd.job_values(args)
    assert values is not None
    job = JobSpec.model_validate(values)
    assert (job.job_id, job.model, job.steps, job.lr, job.optimizer) == (
        "from-file",
        "resnet18",
        120,
        0.05,
        "adamw",
    )
    assert job.betas == (0.8, 0.99) and job.compression == "int8" and job.global_batch == 32
    assert job.nesterov is True and job.seed == 7
    monkeypatch.delenv("ZEROWIRE_SEED")
    assert cmd.job_values(parse()) is None  # no job options: keep the stored job


def test_every_jobspec_field_has_a_flag() -> None:
    from jobspec import JobSpec

    assert {field for _flag, field, _help in cmd.JOB_OPTIONS} == set(JobSpec.model_fields)


def test_bad_options_exit_2_with_a_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    assert main(["coordinator", "--db", db, "--token", "t", "--heartbeat-timeout", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zerowire coordinator: ") and "must be shorter than" in err
    assert main(["coordinator", "--db", db]) == 2
    assert "token is required" in capsys.readouterr().err
    assert main(["coordinator", "--db", db, "--token", "t", "--steps", "abc"]) == 2
    assert "invalid job: --steps must be an integer >= 1" in capsys.readouterr().err
    assert main(["coordinator", "--db", db, "--token", "t", "--optimizer", "lion"]) == 2
    assert "invalid job: --optimizer must be 'sgd' or 'adamw'" in capsys.readouterr().err
    assert main(["coordinator", "--db", db, "--token", "t", "--port", "70000"]) == 2
    assert "invalid port" in capsys.readouterr().err
    assert main(["coordinator", "--db", db, "--token", "t", "--progress-timeout", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "heartbeat timeout (2 s) must be shorter than progress timeout (1.5 s)" in err
    assert main(["coordinator", "--db", db, "--token", "t", "--job", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()  # nothing started, nothing written


def test_a_different_job_on_an_existing_db_is_refused_before_serving(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import sqlite3

    from coordinator.store import Store
    from jobspec import JobSpec

    db = tmp_path / "c.db"
    store = Store(db)
    store.open()
    store.save_job(JobSpec.model_validate({"job_id": "first"}).canonical_json())
    store.close()
    assert main(["coordinator", "--db", str(db), "--token", "t", "--job-id", "second"]) == 2
    err = capsys.readouterr().err
    assert "holds job 'first'" in err and "'second'" in err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone() == (0,)
