"""Every route x every credential answers exactly the status of the access table (auth_table.py), the table
covers every route the app serves, and the OpenAPI document says what the server enforces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.deps import get_clock
from jobspec import JobSpec
from tests.unit.coordinator.auth_table import CREDENTIALS, EXPECTED, render
from tests.unit.coordinator.conftest import ADMIN_TOKEN, READ_TOKEN, TOKEN, Api, bearer, make_settings

README = Path(__file__).resolve().parents[3] / "README.md"
SCHEME_OF = {
    "cluster": "clusterToken",
    "other_worker": "workerSecret",
    "own_worker": "workerSecret",
    "read": "readToken",
    "admin": "adminToken",
}


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app answers: the OpenAPI schema's operations plus the routes left out of it
    (the documentation itself)."""
    schema = app.openapi()
    found = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    for route in app.routes:
        if isinstance(route, APIRoute | Route) and not getattr(route, "include_in_schema", True):
            found |= {(m, route.path) for m in (route.methods or ()) if m != "HEAD"}
    return found


async def fresh_api(tmp_path: Path, **settings: Any) -> tuple[Api, Any]:
    """A coordinator on its own in-memory database with live workers `a` and `b` (the caller closes the
    lifespan context)."""
    app = create_app(
        make_settings(tmp_path, db=":memory:", **settings),
        JobSpec.model_validate({"job_id": "auth", "min_workers": 2}),
        clock=(clock := FakeClock()),
        background=False,
    )
    app.dependency_overrides[get_clock] = lambda: clock
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c")
    api = Api(app, client, clock, app.state.service)
    for wid in ("a", "b"):
        assert (await api.register(wid)).status_code == 201
    return api, lifespan


def credential_headers(api: Api, credential: str) -> dict[str, str]:
    return {
        "none": {},
        "wrong": bearer("not-a-token-anyone-knows"),
        "cluster": bearer(TOKEN),
        "other_worker": api.as_worker("a"),
        "own_worker": api.as_worker("b"),
        "read": bearer(READ_TOKEN),
        "admin": bearer(ADMIN_TOKEN),
    }[credential]


def request_for(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """A well-formed request of the route (routes of one worker name `b`)."""
    url = path.replace("{worker_id}", "b")
    assert not re.search(r"\{[^}]+\}", url), f"no sample value for a parameter of {path}"
    kwargs: dict[str, Any] = {}
    if (method, path) == ("POST", "/workers/register"):
        kwargs["json"] = {
            "worker_id": "c",
            "host": "127.0.0.1",
            "port": 7000,
            "host_id": "h",
            "device": "cpu",
        }
    elif path.endswith("/heartbeat"):
        kwargs["json"] = {"epoch": 2, "step": 1}
    elif path.endswith("/suspect"):
        kwargs["json"] = {"epoch": 2, "suspect": "a", "reason": "unreachable"}
    elif path == "/training/ready":
        kwargs["params"] = {"wait_s": 0}
    return url, kwargs


async def test_every_route_and_credential_answers_the_expected_status(tmp_path: Path) -> None:
    probe, lifespan = await fresh_api(tmp_path)
    served = served_routes(probe.app)
    schema = probe.app.openapi()
    await probe.client.aclose()
    await lifespan.__aexit__(None, None, None)
    missing = served - set(EXPECTED)
    assert not missing, f"routes without a row in the access table: {sorted(missing)}"
    assert set(EXPECTED) <= served, f"rows for routes the app does not serve: {set(EXPECTED) - served}"

    observed: dict[tuple[str, str], tuple[int, ...]] = {}
    for (method, path), _expected in EXPECTED.items():
        codes = []
        for credential, _label in CREDENTIALS:
            api, lifespan = await fresh_api(tmp_path)
            try:
                url, kwargs = request_for(method, path)
                r = await api.client.request(
                    method, url, headers=credential_headers(api, credential), **kwargs
                )
                codes.append(r.status_code)
                if r.status_code == 401:
                    assert r.headers.get("www-authenticate", "").split()[0] in ("Bearer", "Basic")
            finally:
                await api.client.aclose()
                await lifespan.__aexit__(None, None, None)
        observed[(method, path)] = tuple(codes)
    print("\n" + render(observed))
    assert observed == EXPECTED

    # The OpenAPI document: who may call each operation, and every refusal it can answer.
    for (method, path), codes in EXPECTED.items():
        operation = schema["paths"].get(path, {}).get(method.lower())
        if operation is None:
            continue  # the documentation routes are not in the schema
        listed = {name for alternative in operation.get("security", []) for name in alternative}
        if codes[0] < 300:  # open to anyone (/healthz)
            assert listed == set(), (method, path)
        else:
            granted = {SCHEME_OF[c] for (c, _), code in zip(CREDENTIALS, codes, strict=True) if code < 300}
            assert listed == granted, (method, path)
        refusals = {str(code) for code in codes if code >= 400}
        assert refusals <= set(operation["responses"]), (method, path, refusals)


def test_the_readme_carries_the_access_table() -> None:
    assert render() in README.read_text(encoding="utf-8"), (
        "README.md's access table differs from tests/unit/coordinator/auth_table.py: paste "
        "`python -m tests.unit.coordinator.auth_table` into it"
    )


async def test_every_error_status_is_documented_per_route(api: Api) -> None:
    schema = api.app.openapi()
    statuses = {
        (method.upper(), path): {int(code) for code in op["responses"] if code != "default"}
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }
    assert statuses[("POST", "/workers/register")] >= {201, 401, 403, 409, 413, 422, 429}
    assert statuses[("POST", "/workers/{worker_id}/heartbeat")] >= {200, 401, 403, 404, 409, 410, 413, 422}
    assert statuses[("POST", "/workers/{worker_id}/suspect")] >= {200, 401, 403, 404, 409, 410, 413, 422}
    assert statuses[("DELETE", "/workers/{worker_id}")] >= {204, 401, 403, 404, 422}
    assert statuses[("GET", "/training/ready")] >= {200, 401, 403, 422}
    assert statuses[("GET", "/healthz")] == {200}
    for key, codes in statuses.items():
        if key != ("GET", "/healthz"):
            assert 401 in codes, key
    assert set(schema["components"]["securitySchemes"]) == {
        "clusterToken",
        "workerSecret",
        "readToken",
        "adminToken",
    }
    rate = schema["paths"]["/workers/register"]["post"]["responses"]["429"]
    assert "Retry-After" in rate["headers"]


async def test_docs_open_in_a_browser_with_basic_credentials(api: Api) -> None:
    anon = {"Authorization": ""}
    r = await api.client.get("/docs", headers=anon)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert (await api.client.get("/docs", auth=("any-name", READ_TOKEN))).status_code == 200
    assert (await api.client.get("/openapi.json", auth=("", ADMIN_TOKEN))).status_code == 200
    assert (await api.client.get("/openapi.json", auth=("x", TOKEN))).status_code == 403
    assert (await api.client.get("/openapi.json", auth=("x", "nope"))).status_code == 401
    # Basic credentials count on the documentation only
    assert (await api.client.get("/cluster/status", auth=("x", READ_TOKEN))).status_code == 401
    assert (await api.client.get("/redoc", headers=anon)).status_code == 404


async def test_without_read_or_admin_token_the_operator_routes_answer_no_one(tmp_path: Path) -> None:
    api, lifespan = await fresh_api(tmp_path, read_token=None, admin_token=None)
    try:
        for token in (TOKEN, READ_TOKEN, ADMIN_TOKEN):
            assert (await api.client.get("/cluster/status", headers=bearer(token))).status_code in (401, 403)
        r = await api.client.delete("/workers/a", headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 401  # no admin token configured: eviction is disabled
        assert (await api.client.get("/workers", headers=api.as_worker("a"))).status_code == 200
    finally:
        await api.client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_insecure_no_auth_serves_without_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None, read_token=None, admin_token=None, insecure_no_auth=True)
    app = create_app(settings, background=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client:
            assert (await client.get("/workers")).status_code == 200
            body = {"worker_id": "a", "host": "h", "port": 1, "host_id": "h", "device": "cpu"}
            secret = (await client.post("/workers/register", json=body)).json()["worker_secret"]
            assert (await client.post("/workers/a/heartbeat", json={"epoch": 1})).status_code == 200
            # still a live id moves only with its secret
            assert (await client.post("/workers/register", json=body)).status_code == 403
            again = await client.post("/workers/register", json=body, headers={"X-Worker-Secret": secret})
            assert again.status_code == 201
            await client.post("/workers/register", json={**body, "worker_id": "b"})
            mine = await client.get("/training/ready", headers=bearer(secret))  # a worker still gets its keys
            assert list(mine.json()["peer_keys"]) == ["b"]
            assert (await client.get("/training/ready")).json()["peer_keys"] == {}
            assert (await client.delete("/workers/a", headers=bearer("whatever"))).status_code == 204


def test_tokens_are_required_and_distinct(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cluster token is required"):
        make_settings(tmp_path, token=None)
    with pytest.raises(ValueError, match="cluster token is required"):
        make_settings(tmp_path, token="")
    with pytest.raises(ValueError, match="--token and --read-token must differ"):
        make_settings(tmp_path, read_token=TOKEN)
    with pytest.raises(ValueError, match="--read-token and --admin-token must differ"):
        make_settings(tmp_path, admin_token=READ_TOKEN)
    assert make_settings(tmp_path, read_token="").read_token is None  # an empty variable is unset
