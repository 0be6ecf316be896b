"""Coordinator and workers in separate Linux network namespaces, each with its own address.

The test builds its own little network: a hub namespace with a bridge, and one namespace per process
joined to it by a veth pair (10.x addresses, only inside namespaces this test creates, all removed at
the end). Workers bind 0.0.0.0 and advertise the address of their route to the coordinator, so this
checks what a multi-machine deployment needs: bind vs advertised address, and peers dialling each other
across hosts. Mid-run the two workers are cut off from each other (a blackhole route in each namespace)
while both still reach the coordinator: the diagnosis names the partition within 5 s, and once the routes
are gone the job goes on to its end. Skipped where `ip netns add` is not permitted.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import READ_TOKEN, env, processes_mentioning, wait_for, zw

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


class Net:
    def __init__(self) -> None:
        tag = f"{random.randrange(16**6):06x}"
        self.hub = f"zwh{tag}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.namespaces: list[str] = []
        sh("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        self.tag = tag

    def host(self, index: int) -> tuple[str, str]:
        """A namespace with address SUBNET.(index+1) on the hub's bridge: (namespace, address)."""
        ns = f"zw{index}{self.tag}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh(
            "ip",
            "-n",
            self.hub,
            "link",
            "add",
            f"h{index}",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        sh("ip", "-n", self.hub, "link", "set", f"h{index}", "master", "br0", "up")
        address = f"{self.subnet}.{index + 1}"
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns, address

    def remove(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def net() -> Iterator[Net]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    probe = f"zwprobe{random.randrange(16**6):06x}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode != 0:
        pytest.skip("`ip netns add` is not permitted here")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    network = Net()
    try:
        yield network
    finally:
        network.remove()


def in_ns(ns: str, args: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


# Polls the coordinator from inside a namespace (standard library only, so it starts at once) and keeps the
# latest /cluster/status and /cluster/diagnosis in one JSON file; it stops by itself.
POLLER = """
import json, os, sys, time, urllib.request
url, token, out = sys.argv[1:4]
deadline = time.monotonic() + 110
while time.monotonic() < deadline:
    snap = {"time": time.time()}
    for path in ("/cluster/status", "/cluster/diagnosis"):
        req = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, timeout=2) as answer:
                snap[path] = json.load(answer)
        except Exception as exc:
            snap[path] = {"error": repr(exc)}
    with open(out + ".tmp", "w") as f:
        json.dump(snap, f)
    os.replace(out + ".tmp", out)
    time.sleep(0.1)
"""


def test_workers_in_other_namespaces_train_over_their_own_addresses(
    net: Net, reaper: ProcessReaper, tmp_path: Path
) -> None:
    coord_ns, coord_ip = net.host(0)
    workers = [net.host(1), net.host(2)]
    url = f"http://{coord_ip}:8765"
    polled = tmp_path / "polled.json"

    def latest(path: str) -> dict[str, Any] | None:
        try:
            found = json.loads(polled.read_text())[path]
        except (FileNotFoundError, ValueError):
            return None
        return None if "error" in found else found

    log = open(tmp_path / "coordinator.log", "wb")
    reaper.spawn(
        in_ns(
            coord_ns,
            zw(
                "coordinator", "--host", "0.0.0.0", "--port", "8765", "--db", str(tmp_path / "c.db"),
                "--steps", "60", "--warmup-steps", "0", "--global-batch", "32", "--min-workers", "2",
            ),
        ),
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    reaper.spawn(in_ns(coord_ns, [sys.executable, "-c", POLLER, url, READ_TOKEN, str(polled)]), env=env())
    wait_for(lambda: latest("/cluster/status"), 60, "the coordinator in its namespace")
    procs = []
    for i, (ns, _ip) in enumerate(workers):
        wlog = open(tmp_path / f"w{i}.log", "wb")
        procs.append(
            reaper.spawn(
                in_ns(
                    ns,
                    zw(
                        "worker", "--coordinator", url, "--worker-id", f"w{i}", "--bind", "0.0.0.0:0",
                        "--host-id", f"machine-{i}", "--device", "cpu", "--threads", "1",
                        "--checkpoint-dir", str(tmp_path / f"ckpt{i}"),
                        "--save-model", str(tmp_path / f"model{i}.safetensors"),
                    ),
                ),
                env=env(),
                stdout=wlog,
                stderr=subprocess.STDOUT,
            )
        )  # fmt: skip

    def training() -> dict[str, Any] | None:
        status = latest("/cluster/status")
        steps = [w.get("committed_step", -1) for w in (status or {}).get("workers", [])]
        return status if len(steps) == 2 and min(steps) >= 2 else None

    seen = wait_for(training, 90, "both workers training", every_s=0.05)
    hosts = {w["worker_id"]: w["host"] for w in seen["workers"]}
    assert hosts == {"w0": workers[0][1], "w1": workers[1][1]}, "each advertises its own namespace address"

    # cut the workers off from each other; each still reaches the coordinator
    cut_at = time.time()
    for (ns, _), (_, peer_ip) in ((workers[0], workers[1]), (workers[1], workers[0])):
        sh("ip", "-n", ns, "route", "add", "blackhole", f"{peer_ip}/32")

    def partition() -> dict[str, Any] | None:
        found = latest("/cluster/diagnosis")
        named = sorted(s["worker_id"] for s in (found or {}).get("suspects", []))
        return found if named == ["w0", "w1"] else None

    found = wait_for(partition, 10, "the diagnosis to name the partition", every_s=0.05)
    named_s = time.time() - cut_at
    for (ns, _), (_, peer_ip) in ((workers[0], workers[1]), (workers[1], workers[0])):
        sh("ip", "-n", ns, "route", "del", "blackhole", f"{peer_ip}/32")
    assert all(s["reason"].startswith("partition") for s in found["suspects"]), found
    assert "partitioned" in found["summary"], found["summary"]
    print(f"\ndiagnosis named the partition {named_s:.2f} s after the cut: {found['summary']}")
    assert named_s < 5.0, named_s

    for i, proc in enumerate(procs):
        assert proc.wait(90) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    wait_for(lambda: (latest("/cluster/status") or {}).get("state") == "finished", 10, "the job finished")
    assert (tmp_path / "model0.safetensors").exists() or (tmp_path / "model1.safetensors").exists()
    reaper.kill_all()
    assert processes_mentioning(str(tmp_path)) == []
