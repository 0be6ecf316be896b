"""The coordinator's live page in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium over WebDriver): a real coordinator process fed real registrations and heartbeats over HTTP.

Three members; w2 goes silent while w0 and w1 report waiting on it. The page must show every worker's
values, grey out w2's (its heartbeat is old), show the diagnosis naming w2 in red, draw the curves and the
formation, take the read token from the URL fragment and leave it nowhere on the page or in the address bar,
and show an error, not data, for a wrong token. Then the coordinator is SIGKILLed (the page greys out
everything once it stops answering) and restarted on its database (the page shows the values it read back as
from before the restart, greyed out, until the workers' next heartbeats)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import (
    READ_TOKEN,
    TOKEN,
    processes_mentioning,
    start_coordinator,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SCREENSHOT = Path("/tmp/zerowire-page.png")  # a copy for a person to look at
INTERVAL = 0.2  # heartbeat interval: the page greys values older than 3 of them
GREY = "rgb(138, 146, 156)"  # style.css --muted
RED = "rgb(179, 38, 30)"  # style.css --alert
STEPS_SENT = 6  # steps 0..5 committed; the members wait in step 6
# What the page shows, read at once (the page redraws its tables every second).
SNAPSHOT = """
const text = (id) => document.getElementById(id).textContent.trim();
const shown = (id) => document.getElementById(id).offsetParent !== null;
const workers = {};
for (const tr of document.querySelectorAll("#workers tbody tr")) {
  const cells = {};
  for (const td of tr.querySelectorAll("td")) cells[td.dataset.col] = td.textContent;
  const color = getComputedStyle(tr.querySelector("td")).color;
  workers[tr.dataset.workerId] = {class: tr.className, title: tr.title, color, cells};
}
const box = document.getElementById("diagnosis");
const formation = document.querySelector("#formations tbody tr");
return {
  error: shown("error") ? text("error") : "",
  data_shown: shown("data"),
  login_shown: shown("login"),
  workers,
  diagnosis: {class: box.className, text: box.textContent.trim(), color: getComputedStyle(box).color},
  job: text("job-id"),
  epoch: text("epoch"),
  phase: text("phase"),
  loss_points: document.getElementById("loss-chart").dataset.points,
  accuracy_points: document.getElementById("accuracy-chart").dataset.points,
  loss_lines: document.querySelectorAll("#loss-chart polyline").length,
  formation: formation ? [...formation.querySelectorAll("td")].map((td) => td.textContent) : [],
  events: text("events"),
  offline: document.getElementById("data").classList.contains("offline"),
  step_stale: document.getElementById("step").classList.contains("stale"),
  restored_note: shown("restored-note"),
  text: document.body.innerText,
};
"""


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "needs Debian's chromium and chromium-driver "
            "(apt-get install -y --no-install-recommends chromium chromium-driver)"
        )
    return chromium, driver


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: httpx.Client, names: list[str]) -> dict[str, str]:
    secrets = {}
    for i, wid in enumerate(names):
        body = {"worker_id": wid, "host": "127.0.0.1", "port": 7000 + i, "host_id": f"h{i}", "device": "cpu"}
        r = client.post("/workers/register", json=body, headers=as_(TOKEN))
        assert r.status_code == 201, r.text
        secrets[wid] = r.json()["worker_secret"]
    return secrets


def telemetry(i: int) -> dict[str, Any]:
    """What member i reports at step 5: w2 is twice as slow as the others."""
    slow = 2.0 if i == 2 else 1.0
    return {
        "state": "training",
        "step": STEPS_SENT - 1,
        "committed_step": STEPS_SENT - 1,
        "compute_s": 0.12 * slow,
        "comm_s": 0.05,
        "wait_s": 0.02 * slow,
        "data_wait_s": 0.01 * slow,
        "samples_per_s": 512.0 / slow,
        "bytes_by_lane": {"grpc": 1_500_000, "local": 3_000_000},
        "recovery": {"epoch": 3, "mode": "fresh", "resumed_at": 0, "steps_lost": 0, "seconds": 0.4 + 0.1 * i},
    }


def beat(client: httpx.Client, wid: str, secret: str, body: dict[str, Any]) -> None:
    r = client.post(f"/workers/{wid}/heartbeat", json={"epoch": 3, **body}, headers=as_(secret))
    assert r.status_code == 200, r.text


def start_browser(reaper: ProcessReaper, tmp_path: Path) -> tuple[WebDriver, subprocess.Popen[bytes]]:
    chromium, chromedriver = browser_binaries()
    port = free_port()
    driver_proc = reaper.spawn(
        [chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"

    def driver_ready() -> bool:
        try:
            return httpx.get(f"{url}/status", timeout=1).json()["value"]["ready"] is True
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    wait_for(driver_ready, 10, "chromedriver", every_s=0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    return webdriver.Remote(command_executor=url, options=options), driver_proc


def test_the_live_page_in_headless_chromium(reaper: ProcessReaper, tmp_path: Path) -> None:
    started = time.monotonic()
    flags = (
        *("--heartbeat-interval", str(INTERVAL), "--progress-timeout", "30"),
        *("--job-id", "page-job", "--min-workers", "3", "--steps", "100"),
    )
    # w2 stays a member (frozen, not yet dead) for the whole test
    coordinator, base = start_coordinator(reaper, tmp_path, *flags, heartbeat_timeout="20")
    client = httpx.Client(base_url=base, timeout=5.0)
    secrets = register(client, ["w0", "w1", "w2"])
    for step in range(STEPS_SENT):  # the curve: one loss per committed step, two evaluations
        body: dict[str, Any] = {
            "loss": 2.3 * 0.8**step,
            "loss_step": step,
            "step": step,
            "committed_step": step,
        }
        if step in (2, 5):
            body |= {"test_loss": 1.9 - 0.2 * step, "test_accuracy": 0.3 + 0.1 * step, "test_step": step}
        beat(client, "w0", secrets["w0"], body)
    beat(client, "w2", secrets["w2"], telemetry(2))  # its last heartbeat: it freezes in step 6

    stop = threading.Event()

    def the_others_wait_on_w2() -> None:
        since = 0.0
        with httpx.Client(base_url=base, timeout=2.0) as hb:
            while not stop.wait(INTERVAL):
                since += INTERVAL
                for i, wid in enumerate(("w0", "w1")):
                    waiting = {"op": "all_gather", "lane": "grpc", "epoch": 3, "step": STEPS_SENT, "unit": 2}
                    body = telemetry(i) | {"waiting": {**waiting, "peers": [2], "since_s": since}}
                    beat(hb, wid, secrets[wid], body)

    beats = threading.Thread(target=the_others_wait_on_w2, daemon=True)
    beats.start()
    browser, driver_proc = start_browser(reaper, tmp_path)
    try:
        wait = WebDriverWait(browser, 10, poll_frequency=0.1)

        def seen() -> dict[str, Any]:
            page: dict[str, Any] = browser.execute_script(SNAPSHOT)
            return page

        # a wrong token: an error, no data, and the token gone from the address bar
        browser.get(f"{base}/#token=not-the-read-token")
        page = wait.until(lambda _: (p := seen())["error"] and p)
        assert "refused this token (401)" in page["error"], page["error"]
        assert (page["data_shown"], page["login_shown"], page["workers"]) == (False, True, {})
        assert "token" not in browser.current_url

        # the read token in the fragment of the same tab's address: taken, kept for the tab, then removed
        browser.get(f"{base}/#token={READ_TOKEN}")
        page = wait.until(lambda _: (p := seen())["diagnosis"]["class"] == "alert" and p)
        assert browser.current_url == f"{base}/" and page["error"] == ""
        assert browser.execute_script("return sessionStorage.getItem('zerowire.readToken')") == READ_TOKEN

        # w2 frozen: the diagnosis names it, in red
        diagnosis = page["diagnosis"]
        assert diagnosis["text"].startswith("Hang suspected:"), diagnosis["text"]
        assert "w0 and w1 have waited" in diagnosis["text"], diagnosis["text"]
        assert "for rank 2 (w2 on host h2)" in diagnosis["text"], diagnosis["text"]
        assert diagnosis["color"] == RED
        # every worker's values; w2's greyed out (its heartbeat is old), the others' not
        page = wait.until(lambda _: (p := seen())["workers"]["w2"]["class"] == "stale" and p)
        workers = page["workers"]
        assert sorted(workers) == ["w0", "w1", "w2"]
        assert (workers["w2"]["color"], workers["w2"]["title"][-5:]) == (GREY, "s old")
        assert workers["w0"]["class"] == "" and workers["w0"]["color"] != GREY
        w0, w2 = workers["w0"]["cells"], workers["w2"]["cells"]
        assert (w0["worker"], w0["host"], w0["rank"], w0["state"]) == (
            "w0",
            "h0 (127.0.0.1)",
            "0",
            "training",
        )
        assert (w0["committed"], w0["compute"], w0["comm"], w0["data-wait"]) == (
            "5",
            "0.120 s",
            "0.050 s",
            "0.010 s",
        )
        assert (w0["images"], w0["lanes"], w0["straggler"]) == (
            "512.0",
            "grpc 1.5 MB · local 3.0 MB",
            "1.00×",
        )
        assert (w2["worker"], w2["rank"], w2["images"], w2["straggler"]) == ("w2", "2", "256.0", "2.00×")
        assert float(w2["age"].removesuffix(" s")) > 3 * INTERVAL > float(w0["age"].removesuffix(" s"))

        # the job, the curves, the formation and the events
        assert (page["job"], page["epoch"], page["phase"]) == ("page-job", "3", "training")
        assert not page["step_stale"]  # w0 and w1 report it afresh
        assert (page["loss_points"], page["accuracy_points"], page["loss_lines"]) == (str(STEPS_SENT), "2", 2)
        assert page["formation"][:2] == ["3", "fresh"] and "0.60 s" in page["formation"], page["formation"]
        assert "worker w2 joined" in page["events"] and "fresh at step 0" in page["events"]

        # the token is nowhere on the page, nor in the address bar
        assert READ_TOKEN not in browser.page_source and READ_TOKEN not in page["text"]
        assert "token" not in browser.current_url
        assert browser.get_screenshot_as_file(str(tmp_path / "page.png"))
        shutil.copyfile(tmp_path / "page.png", SCREENSHOT)
        assert (tmp_path / "page.png").stat().st_size > 10_000

        # the coordinator killed: after a few seconds without an answer everything shown is greyed out
        stop.set()
        beats.join(timeout=5)
        os.killpg(coordinator.pid, signal.SIGKILL)
        coordinator.wait(timeout=10)
        page = wait.until(lambda _: (p := seen())["offline"] and p)
        assert page["workers"]["w0"]["color"] == GREY and "no answer from the coordinator" in page["text"]
        # restarted on its database: the values it reads back are shown as from before the restart
        port = int(base.rsplit(":", 1)[1])
        coordinator, _ = start_coordinator(reaper, tmp_path, *flags, heartbeat_timeout="20", port=port)
        page = wait.until(
            lambda _: not (p := seen())["offline"] and p["workers"]["w0"]["class"] == "stale" and p
        )
        assert page["restored_note"] and page["workers"]["w0"]["cells"]["age"].endswith("s (before restart)")
        assert page["workers"]["w0"]["cells"]["committed"] == "5"  # the stored value, not hidden, not new
        assert page["step_stale"]  # the job's step comes from those values: greyed out too
        assert browser.get_screenshot_as_file(str(tmp_path / "restarted.png"))
    finally:
        stop.set()
        browser.quit()
        os.killpg(driver_proc.pid, signal.SIGKILL)
        driver_proc.wait(timeout=10)
        beats.join(timeout=5)
    coordinator.terminate()
    assert coordinator.wait(timeout=15) is not None
    assert READ_TOKEN not in (tmp_path / "coordinator.log").read_text()  # nor in the coordinator's log
    wait_for(lambda: not processes_mentioning(str(tmp_path)), 10, "chromium and the coordinator to end")
    print(f"\nlive page test: {time.monotonic() - started:.1f} s")
