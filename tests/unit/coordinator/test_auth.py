"""Every OpenAPI route needs the bearer token (401 without it or with a wrong one), except /healthz."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from coordinator.app import create_app
from tests.unit.coordinator.conftest import TOKEN, Api, make_settings

BAD_HEADERS = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
]


async def test_every_route_but_healthz_requires_the_token(api: Api) -> None:
    await api.register("a")
    before = (await api.client.get("/cluster/status")).json()
    schema = (await api.client.get("/openapi.json")).json()
    operations = [(path, method) for path, ops in schema["paths"].items() for method in ops]
    # register, heartbeat, leave, workers, ready, job, status, events, metrics, healthz
    assert len(operations) >= 10
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, method in operations:  # the docs say what the server enforces
        expected = None if path == "/healthz" else [{"bearerAuth": []}]
        assert schema["paths"][path][method].get("security") == expected
    checked = 0
    for path, method in operations:
        url = re.sub(r"\{[^}]+\}", "a", path)
        for headers in BAD_HEADERS:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=api.app), base_url="http://c"
            ) as anon:
                r = await anon.request(method.upper(), url, headers=headers, json={})
            if path == "/healthz":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                checked += 1
    assert checked == (len(operations) - 1) * len(BAD_HEADERS)
    after = (await api.client.get("/cluster/status")).json()
    assert after["epoch"] == before["epoch"] and after["workers"] == before["workers"]


async def test_insecure_no_auth_serves_without_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None, insecure_no_auth=True)
    app = create_app(settings, background=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client:
            assert (await client.get("/workers")).status_code == 200


def test_token_is_required_without_insecure_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cluster token is required"):
        make_settings(tmp_path, token=None)
    with pytest.raises(ValueError, match="cluster token is required"):
        make_settings(tmp_path, token="")
