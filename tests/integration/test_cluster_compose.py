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
import time
from pathlib import Path

import pytest

from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import env, get, healthy, processes_mentioning, wait_for, zw

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cuda.yml")


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


def service_command(name: str) -> list[str]:
    """The service's `command:` (written as a flow list, which is JSON)."""
    block = service_block((ROOT / "docker-compose.yml").read_text(), name)
    match = re.search(r"^    command: (\[.*\])$", block, flags=re.M)
    assert match, f"service {name} has no one-line command list"
    return list(json.loads(match.group(1)))


def service_environment(name: str) -> dict[str, str]:
    """ZEROWIRE_* variables of the service with their `${VAR:-default}` defaults."""
    block = service_block((ROOT / "docker-compose.yml").read_text(), name)
    found = re.findall(r"^      (ZEROWIRE_\w+): \$\{\w+:-([^}]*)\}$", block, flags=re.M)
    return dict(found)


def test_the_compose_file_wires_the_services_together() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    worker = service_block(text, "worker")
    coordinator = service_block(text, "coordinator")
    assert re.search(r"depends_on:\n\s+coordinator:\n\s+condition: service_healthy", worker)
    assert "/healthz" in coordinator and "healthcheck:" in coordinator
    assert (
        "ZEROWIRE_TOKEN: ${ZEROWIRE_TOKEN:?" in coordinator and "ZEROWIRE_TOKEN: ${ZEROWIRE_TOKEN:?" in worker
    )
    assert "state:/state" in coordinator and "state:/state" in worker
    assert "http://coordinator:8765" in service_command("worker")
    assert "capabilities: [gpu]" in (ROOT / "docker-compose.cuda.yml").read_text()


@pytest.mark.timeout(180)
def test_the_services_commands_form_a_cluster_behind_a_barrier(reaper: ProcessReaper, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def local(cmd: list[str], index: int = 0) -> list[str]:
        mapped = []
        for arg in cmd:
            arg = arg.replace("http://coordinator:8765", url).replace("/state", str(tmp_path / "state"))
            arg = arg.replace("/data", str(tmp_path / "data"))
            mapped.append(arg)
        if "--port" in mapped:
            mapped[mapped.index("--port") + 1] = str(port)
        if "--host" in mapped:
            mapped[mapped.index("--host") + 1] = "127.0.0.1"
        if "--bind" in mapped:  # one loopback host for three containers: one port each
            mapped[mapped.index("--bind") + 1] = "127.0.0.1:0"
        return mapped

    (tmp_path / "state").mkdir()
    job_env = service_environment("coordinator")
    assert job_env["ZEROWIRE_MIN_WORKERS"] == "3"
    job_env.update(ZEROWIRE_STEPS="20", ZEROWIRE_CHECKPOINT_EVERY="10", ZEROWIRE_WARMUP_STEPS="0")
    with open(tmp_path / "coordinator.log", "wb") as log:
        reaper.spawn(
            zw(*local(service_command("coordinator"))),
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
                    zw(*local(service_command("worker"))),
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
