"""End to end over TLS: `zerowire run --tls --workers 2` trains digits on real processes with HTTPS for
REST and mutual TLS on gRPC (certificates for 127.0.0.1 made by the run), and while it trains, plaintext
clients are refused at once and clearly: plain HTTP against the coordinator, a client without the
cluster CA, a plaintext gRPC health check against a worker's port."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from communication.tls import client_ssl_context
from tests.conftest import ProcessReaper
from tests.integration.cluster_support import READ_TOKEN, processes_mentioning, start_run, wait_for
from worker.coordinator_client import CoordinatorUnreachable, RetryPolicy, SyncCoordinatorClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def get_tls(url: str, path: str, ca: Path) -> Any:
    response = httpx.get(
        f"{url}{path}",
        headers={"Authorization": f"Bearer {READ_TOKEN}"},
        timeout=5,
        verify=client_ssl_context(ca),
    )
    response.raise_for_status()
    return response.json()


def plaintext_health(address: str) -> tuple[str, float]:
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}", time.monotonic() - started
    return "SERVING", time.monotonic() - started


def test_two_workers_train_digits_over_tls_and_refuse_plaintext(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run, url, log_path = start_run(reaper, tmp_path, "--workers", "2", "--steps", "150", "--tls")
    assert url.startswith("https://127.0.0.1:"), url
    ca = out / "tls" / "ca.pem"
    # REST over HTTPS, the coordinator verified by the run's CA under its name 127.0.0.1.
    seen = wait_for(
        lambda: (s := get_tls(url, "/cluster/status", ca))["state"] == "training" and s["step"] > 0 and s,
        150,
        "training",
    )
    assert seen["world_size"] == 2 and [w["state"] for w in seen["workers"]] == ["alive"] * 2

    # Plain HTTP against the HTTPS port: refused at once; the client says what to change.
    plain = url.replace("https://", "http://")
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="disconnected"):
        httpx.get(f"{plain}/healthz", timeout=5)
    assert time.monotonic() - started < 5
    with SyncCoordinatorClient(plain, READ_TOKEN, timeout_s=5, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(
            CoordinatorUnreachable, match=r"does the coordinator serve HTTPS\? then use an https://"
        ):
            client.cluster_status()
    # HTTPS without the cluster CA: the certificate is not trusted.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", timeout=5)

    # A plaintext gRPC call to a training worker's port fails fast (well within its 10 s deadline).
    for worker in seen["workers"]:
        answer, took = plaintext_health(f"{worker['host']}:{worker['port']}")
        assert answer.startswith("UNAVAILABLE") and "Socket closed" in answer, answer
        assert took < 5

    assert run.wait(240) == 0, log_path.read_text()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["cluster_state"] == "finished"
    assert summary["steps_done"] == summary["steps"] == 150
    # The default job reaches about 0.99 after 150 steps (on 2 or 3 workers alike); 0.9 is a wide margin.
    assert summary["test_accuracy"] > 0.9, summary
    assert summary["world_size_per_step"] == [[0, 2]]
    assert summary["failures"] == []
    assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    assert summary["worker_exit_codes"] == {"worker-0": 0, "worker-1": 0}
    text = log_path.read_text()
    assert "finished: 150/150 steps" in text and "over TLS" in text
    for i in range(2):
        assert "mutual TLS" in (out / "logs" / f"worker-{i}.log").read_text()
    assert "coordinator on https://127.0.0.1" in (out / "logs" / "coordinator.log").read_text()
    assert processes_mentioning(str(tmp_path)) == []
