"""The REST contract to the letter, checked by a schema fuzzer (schemathesis) against the app in-process.

Every operation is fuzzed with requests generated from the served /openapi.json, each with a credential
that passes the route's gate (the cluster token for registration, a live worker's own secret for its
routes, the admin token for the operator routes), so that the input itself is what is tested:
- a schema-valid request is never refused as invalid (no 400 or 422: every bound the models enforce is in
  the schema), and no request gets a 5xx;
- every status answered is one the schema documents, with a body of the documented schema;
- a schema-invalid body is refused (strict types: a number as a string or a boolean is not converted).
The routes' credentials are tested by tests/unit/coordinator/test_auth.py, not here."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    ignored_auth,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.deps import get_clock
from coordinator.schemas import HeartbeatRequest, RecoveryReport, RegisterRequest, SuspectRequest
from jobspec import JobSpec
from tests.unit.coordinator.conftest import ADMIN_TOKEN, TOKEN, bearer, make_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
MAX_EXAMPLES = 40  # per operation: about 450 requests (and as many registrations), in about 12 s
WORKER_BODY = {"host": "127.0.0.1", "port": 50051, "host_id": "h1", "device": "cpu"}


def _app(tmp_path: Path) -> FastAPI:
    job = JobSpec.model_validate({"job_id": "fuzz", "min_workers": 2})
    # A long poll at the barrier ends at once; registrations are not rate-limited (the fuzzer registers many).
    settings = make_settings(
        tmp_path, ready_wait_cap=0.01, max_workers=100_000, register_rate=0, register_rate_global=0
    )
    clock = FakeClock()  # nothing expires while the fuzzer runs
    app = create_app(settings, job, clock=clock, background=False)
    app.dependency_overrides[get_clock] = lambda: clock
    return app


# The schema is read at collection, from the app the tests then serve (its database is created only when
# the client below runs the app's lifespan, in a folder of its own).
APP = _app(Path(tempfile.mkdtemp(prefix="zerowire-fuzz-")))
schema = schemathesis.openapi.from_dict(APP.openapi())
# Derandomized: the same requests on every machine, so the verdict does not depend on the draw.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE], max_examples=MAX_EXAMPLES, deterministic=True, database="none"
)


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    yield APP
    shutil.rmtree(APP.state.settings.db.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://coordinator") as c:  # runs the lifespan (store, restore)
        yield c


def _register(client: TestClient) -> dict[str, str]:
    r = client.post("/workers/register", json=WORKER_BODY, headers=bearer(TOKEN))
    assert r.status_code == 201, r.text
    return {"id": r.json()["worker_id"], "secret": r.json()["worker_secret"]}


@pytest.fixture
def worker(client: TestClient) -> dict[str, str]:
    return _register(client)


def _call(case: Any, client: TestClient) -> Any:
    worker = _register(client)  # fresh for every example: a fuzzed heartbeat may stall it, a report evict it
    if case.path == "/workers/register":
        token = TOKEN
    elif case.path in ("/training/ready", "/workers") or (
        "{worker_id}" in case.path and case.method != "DELETE"
    ):
        if "{worker_id}" in case.path:
            case.path_parameters["worker_id"] = worker["id"]
        token = worker["secret"]
    else:  # operator routes, and DELETE of a fuzzed id (an eviction: 204 or 404)
        token = ADMIN_TOKEN
    kwargs = case.as_transport_kwargs(headers=bearer(token))
    kwargs.pop("base_url", None)
    response = client.request(url=kwargs.pop("url"), **kwargs)
    return response


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_valid_requests_are_answered_as_documented(case: Any, client: TestClient) -> None:
    response = _call(case, client)
    case.validate_response(
        response, checks=[*CHECKS, positive_data_acceptance], excluded_checks=[ignored_auth]
    )
    # Every case carries a credential its route admits, so the input is what the answer is about (but a
    # fuzzed id may be one registered before, which takes that worker's secret: 403 as documented).
    refused = (400, 401, 422) if case.path == "/workers/register" else (400, 401, 403, 422)
    assert response.status_code not in refused, response.text


def _bounds(prop: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, o[k]) for o in (prop, *prop.get("anyOf", [])) for k in ("minimum", "maximum") if k in o]


def test_integer_bounds_are_served_exactly(app: FastAPI) -> None:
    served = app.openapi()["components"]["schemas"]
    for model in (RegisterRequest, RecoveryReport, HeartbeatRequest, SuspectRequest):
        for name, prop in model.model_json_schema()["properties"].items():
            mine, theirs = _bounds(prop), _bounds(served[model.__name__]["properties"][name])
            assert mine == theirs, (model.__name__, name)
            assert [type(v) for _, v in mine] == [type(v) for _, v in theirs], (model.__name__, name)
    assert served["HeartbeatRequest"]["properties"]["epoch"]["maximum"] == 1 << 62


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"epoch": "1"}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"epoch": (1 << 62) + 95}, "epoch"),
        ({"epoch": 1, "bytes_by_lane": {"grpc": 1 << 63}}, "bytes_by_lane"),
        (
            {"epoch": 1, "recovery": {"epoch": 1, "mode": "fresh", "resumed_at": 0, "steps_lost": "3"}},
            "recovery",
        ),
    ],
)
def test_bodies_of_the_wrong_type_or_out_of_bounds_are_refused(
    client: TestClient, worker: dict[str, str], body: dict[str, Any], field: str
) -> None:
    r = client.post(f"/workers/{worker['id']}/heartbeat", json=body, headers=bearer(worker["secret"]))
    assert r.status_code == 422, r.text
    assert any(field in issue["loc"] for issue in r.json()["detail"]), r.json()


def test_a_body_that_is_not_text_answers_the_documented_400(client: TestClient, app: FastAPI) -> None:
    r = client.post(
        "/workers/register", content=b'{"host": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    for path in ("/workers/register", "/workers/{worker_id}/heartbeat", "/workers/{worker_id}/suspect"):
        assert "400" in app.openapi()["paths"][path]["post"]["responses"], path
