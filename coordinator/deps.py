"""FastAPI dependency aliases: settings, service and clock (tests override them). All are `async def`:
FastAPI runs plain `def` dependencies in a thread pool, a costly hop on the heartbeat path."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from coordinator.auth import get_settings
from coordinator.clock import Clock
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings


async def get_service(request: Request) -> CoordinatorService:
    service: CoordinatorService = request.app.state.service
    return service


async def get_clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


SettingsDep = Annotated[CoordinatorSettings, Depends(get_settings)]
ServiceDep = Annotated[CoordinatorService, Depends(get_service)]
ClockDep = Annotated[Clock, Depends(get_clock)]
