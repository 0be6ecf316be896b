"""Bearer-token check shared by every route but /healthz (constant-time comparison)."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from coordinator.settings import CoordinatorSettings

BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": "the cluster token"}


async def get_settings(request: Request) -> CoordinatorSettings:
    settings: CoordinatorSettings = request.app.state.settings
    return settings


async def require_token(request: Request) -> None:
    """Reads the Authorization header directly (no sub-dependency: this runs on every heartbeat)."""
    settings: CoordinatorSettings = request.app.state.settings
    if settings.insecure_no_auth:
        return
    expected = settings.token.get_secret_value().encode() if settings.token is not None else b""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if (
        scheme.lower() != "bearer"
        or not expected
        or not hmac.compare_digest(given.strip().encode(), expected)
    ):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
