"""The OpenAPI document: every error status a route can answer (`errors(...)` for its `responses=`), the
credentials each route admits (one bearer scheme per kind), and /openapi.json and /docs behind a token."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from coordinator.auth import DOCS, SECURITY_SCHEMES
from coordinator.schemas import ErrorBody, ValidationErrorBody

GENERIC: dict[int, str] = {
    400: "the body could not be read as JSON text (for example, bytes that are not UTF-8)",
    401: "no bearer credential, or one this coordinator does not know (WWW-Authenticate: Bearer)",
    403: "the credential is known but does not grant this route (or speaks for another worker)",
    404: "unknown worker id",
    409: "conflict with the membership state",
    410: "the worker was declared dead: it must register again",
    413: "request body larger than max_body_bytes",
    422: "invalid input: the location and message of each problem",
    429: "too many registrations from this address or in all: retry after Retry-After seconds",
}


# The answers of a route a worker calls with its own secret, about its own id.
NOT_OWN_SECRET = (403, "not this worker's secret")
UNKNOWN_WORKER = (404, "unknown worker id: register (again)")


def errors(*codes: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses; a (status, text) pair replaces the generic description."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status, text = code if isinstance(code, tuple) else (code, GENERIC[code])
        model = ValidationErrorBody if status == 422 else ErrorBody
        entry: dict[str, Any] = {"model": model, "description": text}
        if status == 429:
            entry["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def exact_integer_bounds(node: Any) -> Any:
    """The schema with every bound of an integer schema stated as an integer. FastAPI's OpenAPI models hold
    bounds as floats (`le=2**62` is served as 4.611686018427388e18), and a client that reads a float bound
    of an integer compares in floats: 2**62 + 95 looks valid. The bounds of the API are powers of two or
    small numbers, exact as floats, so the integral value is the bound the models enforce (a test compares
    them with the models' own schemas)."""
    if isinstance(node, list):
        return [exact_integer_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: exact_integer_bounds(value) for key, value in node.items()}
    if out.get("type") == "integer":
        for key in _BOUNDS:
            value = out.get(key)
            if isinstance(value, float) and value.is_integer():
                out[key] = int(value)
    return out


def install(app: FastAPI) -> None:
    """Build the schema once, with the security schemes, and serve it and the Swagger UI behind `DOCS`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = exact_integer_bounds(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    gated = [Depends(DOCS)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=gated)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=gated)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")
