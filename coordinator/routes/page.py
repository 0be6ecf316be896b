"""The live page (`GET /`) and its static files, shipped in the package (`coordinator/static/`). They hold
no data and need no credential: the page asks the REST API for everything, with the read token it takes
from the URL fragment (or asks for) and sends as a bearer."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

# What the page may load and call: its own files and this coordinator's API, nothing else.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@cache
def static_file(name: str) -> bytes:
    return files("coordinator").joinpath("static", name).read_bytes()


def serve(name: str) -> Response:
    return Response(static_file(name), media_type=f"{FILES[name]}; charset=utf-8", headers=HEADERS)


def install(app: FastAPI) -> None:
    """Serve the page and its files on ``app`` (out of the OpenAPI document: they are not the API)."""

    @app.get("/", include_in_schema=False)
    async def live_page() -> Response:
        """The live page: job, workers, curves, formations, events and the diagnosis, every second."""
        return serve("index.html")

    @app.get("/static/app.js", include_in_schema=False)
    async def page_script() -> Response:
        return serve("app.js")

    @app.get("/static/style.css", include_in_schema=False)
    async def page_style() -> Response:
        return serve("style.css")
