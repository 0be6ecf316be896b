"""`zerowire run --external-workers`: when a run of workers started elsewhere is over, the exit codes their
launcher leaves, and the options that make no sense without local workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from zerowire.cli import main
from zerowire.external_workers import ExternalWorkers, job_over, read_exit_codes


def view(worker_id: str, state: str) -> dict[str, str]:
    return {"worker_id": worker_id, "state": state}


def test_the_job_is_over_once_it_finished_and_no_worker_is_alive() -> None:
    assert not job_over({})  # nothing heard from the coordinator yet
    assert not job_over({"state": "waiting", "workers": []})
    assert not job_over({"state": "training", "workers": [view("a", "alive")]})
    # a dead worker whose task gives up does not end the job: the others may still finish it
    assert not job_over({"state": "reforming", "workers": [view("a", "dead"), view("b", "alive")]})
    assert not job_over({"state": "finished", "workers": [view("a", "left"), view("b", "alive")]})
    assert job_over({"state": "finished", "workers": [view("a", "left"), view("b", "dead")]})


def test_exit_codes_are_read_from_the_launchers_files(tmp_path: Path) -> None:
    (tmp_path / "n1-0.exit").write_text("0\n")
    (tmp_path / "n1-1.exit").write_text("137\n")
    (tmp_path / "n2-0.exit").write_text("garbled\n")
    (tmp_path / "n2-0.log").write_text("not an exit file\n")
    assert read_exit_codes(tmp_path) == {"n1-0": 0, "n1-1": 137, "n2-0": None}


def test_the_summary_waits_a_moment_for_the_exit_code_of_every_worker_it_saw(tmp_path: Path) -> None:
    cluster = ExternalWorkers(output=tmp_path, workers=2, job_file=tmp_path / "job.toml", exit_wait_s=5.0)
    cluster.start_workers()
    assert {p.name for p in tmp_path.iterdir()} == {"telemetry", "checkpoints", "logs"}
    assert cluster.worker_children() == []  # nothing was started for them
    (tmp_path / "logs" / "a.exit").write_text("0\n")
    late = threading.Timer(0.3, lambda: (tmp_path / "logs" / "b.exit").write_text("0\n"))
    late.start()
    status = {"state": "finished", "workers": [view("a", "left"), view("b", "left")]}
    started = time.monotonic()
    assert cluster.exit_codes(status) == {"a": 0, "b": 0}
    assert 0.2 < time.monotonic() - started < 4.0
    late.join()
    # a worker whose launcher left nothing: None, after the wait
    cluster.exit_wait_s = 0.2
    status["workers"].append(view("c", "dead"))
    assert cluster.exit_codes(status) == {"a": 0, "b": 0, "c": None}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls"], "--tls cannot be used with --external-workers"),
        (["--kill-worker-at-step", "3"], "--kill-worker-at-step cannot be used with --external-workers"),
        (["--coordinator-port", "70000"], "--coordinator-port must be between 0 and 65535"),
    ],
)
def test_options_that_need_local_workers_are_refused(
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ZEROWIRE_TOKEN", "cluster-token-0123456789")
    rc = main(["run", "--external-workers", "--workers", "2", "--output", str(tmp_path / "out"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_external_workers_need_the_cluster_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ZEROWIRE_TOKEN", raising=False)
    rc = main(["run", "--external-workers", "--workers", "2", "--output", str(tmp_path / "out")])
    assert rc == 2 and "needs the cluster token in ZEROWIRE_TOKEN" in capsys.readouterr().err
