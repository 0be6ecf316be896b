"""`zerowire run` on a user's folder of JPEG and PNG files: 2 real workers stream it through their loader
processes, one is SIGKILLed mid-run and the other goes on from its buddy's replica, reading on from the first
uncommitted step: every step is committed once (no sample lost or repeated), the summary names the classes
and the normalisation and reports the time spent waiting for data, no loader process outlives its worker,
and the status hint and the live page's address the run prints work as printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import processes_mentioning, start_run, wait_for
from tests.unit.data.image_tree import CLASSES, make_tree
from zerowire.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def loaders() -> set[int]:
    """PIDs of the loader processes alive (spawned interpreters of multiprocessing)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"multiprocessing.spawn" in cmdline:
            found.add(int(proc.name))
    return found


def test_a_run_on_an_image_folder_survives_a_sigkill(
    reaper: ProcessReaper, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = loaders()
    tree = make_tree(tmp_path / "images", per_class=20)
    run, _url, log = start_run(
        reaper, tmp_path, "--workers", "2", "--dataset", f"imagefolder:{tree}", "--image-size", "16",
        "--steps", "60", "--global-batch", "12", "--data-workers", "2", "--threads", "1",
        "--kill-worker-at-step", "10",
    )  # fmt: skip
    # the status hint it prints works as printed (it carries the run's read-only token)
    hint = wait_for(
        lambda: re.search(
            r"ZEROWIRE_READ_TOKEN=(\S+) zerowire status --coordinator (\S+)\)", log.read_text()
        ),
        30,
        "the hint",
    )
    assert (
        main(["status", "--coordinator", hint.group(2), "--token", hint.group(1), "--diagnose", "--json"])
        == 0
    )
    assert "suspects" in json.loads(capsys.readouterr().out)
    # and so does the live page's address, with the same read token in its fragment
    page = wait_for(lambda: re.search(r"live page at (\S+)/#token=(\S+)", log.read_text()), 10, "the page")
    assert (page.group(1), page.group(2)) == (hint.group(2), hint.group(1))
    served = httpx.get(f"{page.group(1)}/", timeout=5)
    assert served.status_code == 200 and 'src="static/app.js"' in served.text
    history = httpx.get(
        f"{page.group(1)}/cluster/history", headers={"Authorization": f"Bearer {page.group(2)}"}
    )
    assert history.status_code == 200 and "formations" in history.json()
    assert run.wait(150) == 0, log.read_text()[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["steps_redone"] == 0
    drill = summary["fault_drill"]
    assert drill["killed"] and drill["steps_lost"] == 0, drill
    sizes = [size for _, size in summary["world_size_per_step"]]
    assert sizes[0] == 2 and sizes[-1] == 1, summary["world_size_per_step"]  # the survivor read on alone
    assert summary["world_sizes"] == [2] * summary["world_size_per_step"][1][0] + [1] * (
        60 - summary["world_size_per_step"][1][0]
    )  # every step once, in order
    data = summary["data"]
    assert data["classes"] == list(CLASSES) and data["channels"] == 3 and data["bad_images_skipped"] == 0
    assert (data["train_images"], data["test_images"]) == (54, 6)  # 2 of each class's 20 held out
    assert len(data["normalisation"]["mean"]) == 3
    assert summary["step_time_split_s"]["data_wait"] >= 0.0
    assert processes_mentioning(str(tmp_path)) == []
    # no loader process outlives its worker, the SIGKILLed one included (each checks every 0.5 s)
    wait_for(lambda: not (loaders() - before), 5, "the loader processes to end")
