"""Coordinator settings: command-line options and ZEROWIRE_* environment variables, validated at start-up."""

from __future__ import annotations

import itertools
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoordinatorSettings(BaseSettings):
    """Every field is also read from the environment as ZEROWIRE_<FIELD> (for example ZEROWIRE_TOKEN)."""

    model_config = SettingsConfigDict(env_prefix="ZEROWIRE_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int = Field(8765, ge=0, le=65535)
    db: Path = Field(Path("zerowire-coordinator.db"), description="SQLite file (':memory:' keeps nothing)")
    token: SecretStr | None = Field(None, description="cluster bearer token")
    insecure_no_auth: bool = False
    heartbeat_interval: float = Field(0.5, gt=0.0, le=3600.0)
    heartbeat_timeout: float = Field(2.0, gt=0.0, le=86_400.0)
    collective_timeout: float = Field(30.0, gt=0.0)
    barrier_timeout: float = Field(600.0, gt=0.0)
    restart_grace: float | None = Field(
        None,
        ge=0.0,
        description="extra seconds granted to every live worker after a restart (default: timeout)",
    )
    max_workers: int = Field(1024, ge=1, le=100_000)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    ready_wait_cap: float = Field(30.0, gt=0.0, le=600.0, description="longest wait of /training/ready")
    heartbeat_flush_interval: float = Field(1.0, gt=0.0, le=60.0)

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        order = [
            ("heartbeat interval", self.heartbeat_interval),
            ("heartbeat timeout", self.heartbeat_timeout),
            ("collective timeout", self.collective_timeout),
            ("barrier timeout", self.barrier_timeout),
        ]
        for (name_a, a), (name_b, b) in itertools.pairwise(order):
            if not a < b:
                chain = " < ".join(f"{n} ({v:g} s)" for n, v in order)
                raise ValueError(
                    f"timeouts must nest: {name_a} ({a:g} s) must be shorter than {name_b} ({b:g} s); "
                    f"required: {chain}"
                )
        if not self.insecure_no_auth and (self.token is None or not self.token.get_secret_value()):
            raise ValueError(
                "a cluster token is required (--token or ZEROWIRE_TOKEN); --insecure-no-auth disables auth"
            )
        return self

    @property
    def grace_s(self) -> float:
        return self.heartbeat_timeout if self.restart_grace is None else self.restart_grace

    @property
    def reaper_tick_s(self) -> float:
        return min(0.25, self.heartbeat_interval / 2.0)
