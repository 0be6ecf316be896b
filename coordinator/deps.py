"""FastAPI dependency aliases: settings, service and clock (tests override them), and the worker-id path
parameter. The dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a costly hop
on the heartbeat path."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from coordinator.auth import get_settings
from coordinator.clock import Clock
from coordinator.schemas import WORKER_ID_PATTERN
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
WorkerIdPath = Annotated[str, Path(max_length=64, pattern=WORKER_ID_PATTERN)]
