"""The compose files are valid compose-spec documents, and the exact commands of their services form a
working cluster (no Docker engine needed: the commands run as local processes, with the service host
names and volume paths mapped onto loopback and a temporary folder).

The workers' barrier is checked on the way: with the job's min_workers = 3, two workers wait (step 0,
phase `waiting`) until the third one arrives.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from communication.tls import client_ssl_context
from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import (
    READ_TOKEN,
    env,
    get,
    healthy,
    processes_mentioning,
    wait_for,
    zw,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cuda.yml", "docker-compose.tls.yml")
TLS_FILE = "docker-compose.tls.yml"


def check_jsonschema() -> str | None:
    local = ROOT / ".venv" / "bin" / "check-jsonschema"
    return str(local) if local.exists() else shutil.which("check-jsonschema")


@pytest.mark.timeout(60)
def test_compose_files_validate_against_the_compose_spec() -> None:
    tool = check_jsonschema()
    if tool is None:
        pytest.skip("check-jsonschema is not installed (it comes with the dev extras)")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", *(str(ROOT / f) for f in COMPOSE_FILES)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def service_block(text: str, name: str) -> str:
    match = re.search(rf"^  {name}:\n((?:    .*\n|\n)+)", text, flags=re.M)
    assert match, f"service {name} not found"
    return match.group(1)


def service_command(name: str, file: str = "docker-compose.yml") -> list[str]:
    """The service's `command:` (written as a flow list, which is JSON)."""
    block = service_block((ROOT / file).read_text(), name)
    match = re.search(r"^    command: (\[.*\])$", block, flags=re.M)
    assert match, f"service {name} has no one-line command list"
    return list(json.loads(match.group(1)))


def service_environment(name: str) -> dict[str, str]:
    """ZEROWIRE_* variables of the service with their `${VAR:-default}` defaults (an empty default means
    the operator's own environment decides, so it is left out)."""
    block = service_block((ROOT / "docker-compose.yml").read_text(), name)
    found = re.findall(r"^      (ZEROWIRE_\w+): \$\{\w+:-([^}]*)\}$", block, flags=re.M)
    return {k: v for k, v in found if v}


def tls_environment(name: str) -> dict[str, str]:
    """ZEROWIRE_* variables of the service in the TLS override (plain values)."""
    block = service_block((ROOT / TLS_FILE).read_text(), name)
    return dict(re.findall(r"^      (ZEROWIRE_\w+): (\S+)$", block, flags=re.M))


def local(cmd: list[str], port: int, tmp_path: Path) -> list[str]:
    """A service's arguments with the service host names and volume paths mapped onto loopback and
    `tmp_path` (the coordinator on `port`, every worker on a free port of its own)."""
    mapped = []
    for arg in cmd:
        arg = re.sub(r"^(https?)://coordinator:8765", rf"\1://127.0.0.1:{port}", arg)
        for volume in ("/state", "/data", "/certs"):
            arg = arg.replace(volume, str(tmp_path / volume.strip("/")))
        mapped.append(arg)
    if "--port" in mapped:
        mapped[mapped.index("--port") + 1] = str(port)
    if "--host" in mapped:
        mapped[mapped.index("--host") + 1] = "127.0.0.1"
    if "--bind" in mapped:  # one loopback host for three containers: one port each
        mapped[mapped.index("--bind") + 1] = "127.0.0.1:0"
    return mapped


def test_the_compose_file_wires_the_services_together() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    worker = service_block(text, "worker")
    coordinator = service_block(text, "coordinator")
    assert re.search(r"depends_on:\n\s+coordinator:\n\s+condition: service_healthy", worker)
    assert "/healthz" in coordinator and "healthcheck:" in coordinator
    assert (
        "ZEROWIRE_TOKEN: ${ZEROWIRE_TOKEN:?" in coordinator and "ZEROWIRE_TOKEN: ${ZEROWIRE_TOKEN:?" in worker
    )
    assert "ZEROWIRE_READ_TOKEN: ${ZEROWIRE_READ_TOKEN:-}" in coordinator and "READ_TOKEN" not in worker
    assert "state:/state" in coordinator and "state:/state" in worker
    assert "http://coordinator:8765" in service_command("worker")
    assert "capabilities: [gpu]" in (ROOT / "docker-compose.cuda.yml").read_text()


@pytest.mark.timeout(180)
def test_the_services_commands_form_a_cluster_behind_a_barrier(reaper: ProcessReaper, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "state").mkdir()
    job_env = service_environment("coordinator")
    assert job_env["ZEROWIRE_MIN_WORKERS"] == "3"
    job_env.update(ZEROWIRE_STEPS="20", ZEROWIRE_CHECKPOINT_EVERY="10", ZEROWIRE_WARMUP_STEPS="0")
    with open(tmp_path / "coordinator.log", "wb") as log:
        reaper.spawn(
            zw(*local(service_command("coordinator"), port, tmp_path)),
            env=env(**job_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for(lambda: healthy(url), 60, "the coordinator's health check")

    workers = []
    for i in range(3):
        if i == 2:
            # Two workers registered, the job needs three: nobody may step yet.
            wait_for(lambda: len(get(url, "/workers")["workers"]) == 2, 60, "two workers")
            time.sleep(2.0)
            status = get(url, "/cluster/status")
            assert status["state"] == "waiting" and status["step"] == 0
            assert {w["worker_state"] for w in status["workers"]} == {"waiting"}
            assert not (tmp_path / "state" / "checkpoints").exists() or not any(
                (tmp_path / "state" / "checkpoints").iterdir()
            )
        with open(tmp_path / f"worker-{i}.log", "wb") as log:
            workers.append(
                reaper.spawn(
                    zw(*local(service_command("worker"), port, tmp_path)),
                    env=env(ZEROWIRE_THREADS="1"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    for i, proc in enumerate(workers):
        assert proc.wait(150) == 0, (tmp_path / f"worker-{i}.log").read_text()[-3000:]
    status = get(url, "/cluster/status")
    assert status["state"] == "finished"
    assert (tmp_path / "state" / "checkpoints" / "model.safetensors").exists()
    reaper.kill_all()
    assert processes_mentioning(str(tmp_path)) == []


def test_the_tls_override_serves_https_and_mutual_tls() -> None:
    text = (ROOT / TLS_FILE).read_text()
    coordinator, worker = service_block(text, "coordinator"), service_block(text, "worker")
    for block in (coordinator, worker):
        assert "- ${ZEROWIRE_CERTS:-./certs}:/certs:ro" in block
    ca = {"ZEROWIRE_TLS_CA": "/certs/ca.pem"}
    assert tls_environment("coordinator") == {
        "ZEROWIRE_TLS_CERT": "/certs/coordinator.pem",
        "ZEROWIRE_TLS_KEY": "/certs/coordinator.key",
        **ca,
    }
    assert tls_environment("worker") == {
        "ZEROWIRE_TLS_CERT": "/certs/worker.pem",
        "ZEROWIRE_TLS_KEY": "/certs/worker.key",
        **ca,
        "ZEROWIRE_TLS_SERVER_NAME": "worker",
    }
    assert "https://127.0.0.1:8765/healthz" in coordinator and "cafile='/certs/ca.pem'" in coordinator
    # The worker runs the base command, only against https://.
    plain = service_command("worker")
    assert service_command("worker", TLS_FILE) == [a.replace("http://", "https://") for a in plain]


@pytest.mark.timeout(180)
def test_the_tls_override_forms_a_cluster_with_the_certificates_it_documents(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    text = (ROOT / TLS_FILE).read_text()
    documented = re.search(r"^#\s+zerowire (certs \./certs .*)$", text, flags=re.M)
    assert documented, "the override does not say how to make its certificates"
    made = subprocess.run(
        zw(*[str(tmp_path / "certs") if a == "./certs" else a for a in documented.group(1).split()]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    (tmp_path / "state").mkdir()

    def mapped(variables: dict[str, str]) -> dict[str, str]:
        return {k: v.replace("/certs", str(tmp_path / "certs")) for k, v in variables.items()}

    job_env = service_environment("coordinator")
    job_env.update(
        ZEROWIRE_MIN_WORKERS="2", ZEROWIRE_STEPS="4", ZEROWIRE_CHECKPOINT_EVERY="0", ZEROWIRE_WARMUP_STEPS="0"
    )
    with open(tmp_path / "coordinator.log", "wb") as log:
        coordinator = reaper.spawn(
            zw(*local(service_command("coordinator"), port, tmp_path)),
            env=env(**job_env, **mapped(tls_environment("coordinator"))),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # The override's health check, run as the container runs it.
    check = re.search(r'^        - "(import ssl.*)"$', service_block(text, "coordinator"), flags=re.M)
    assert check
    probe = check.group(1).replace("/certs", str(tmp_path / "certs")).replace(":8765/", f":{port}/")
    wait_for(
        lambda: (
            coordinator.poll() is not None
            or subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=10).returncode == 0
        ),
        60,
        "the coordinator's HTTPS health check",
        every_s=0.5,
    )
    assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()[-3000:]
    assert not healthy(f"http://127.0.0.1:{port}")  # plain HTTP gets no answer

    workers = []
    for i in range(2):
        with open(tmp_path / f"worker-{i}.log", "wb") as log:
            workers.append(
                reaper.spawn(
                    zw(*local(service_command("worker", TLS_FILE), port, tmp_path)),
                    env=env(ZEROWIRE_THREADS="1", **mapped(tls_environment("worker"))),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    for i, proc in enumerate(workers):
        assert proc.wait(150) == 0, (tmp_path / f"worker-{i}.log").read_text()[-3000:]
        assert "mutual TLS" in (tmp_path / f"worker-{i}.log").read_text()
    status = httpx.get(
        f"{url}/cluster/status",
        headers={"Authorization": f"Bearer {READ_TOKEN}"},
        verify=client_ssl_context(tmp_path / "certs" / "ca.pem"),
        timeout=5,
    ).json()
    assert status["state"] == "finished"
    assert (tmp_path / "state" / "checkpoints" / "model.safetensors").exists()
    reaper.kill_all()
    assert processes_mentioning(str(tmp_path)) == []
