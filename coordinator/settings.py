"""Coordinator settings: command-line options and ZEROWIRE_* environment variables, validated at start-up."""

from __future__ import annotations

import itertools
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobspec import check_nested_timeouts, check_timeouts


class CoordinatorSettings(BaseSettings):
    """Every field is also read from the environment as ZEROWIRE_<FIELD> (for example ZEROWIRE_TOKEN)."""

    model_config = SettingsConfigDict(env_prefix="ZEROWIRE_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int = Field(8765, ge=0, le=65535)
    db: Path = Field(Path("zerowire-coordinator.db"), description="SQLite file (':memory:' keeps nothing)")
    token: SecretStr | None = Field(None, description="cluster token: admits workers (registration) only")
    read_token: SecretStr | None = Field(
        None, description="read-only operator token: status, events, metrics, listings, the job, /docs"
    )
    admin_token: SecretStr | None = Field(
        None, description="admin operator token: everything read-only plus evicting workers (unset: none)"
    )
    insecure_no_auth: bool = False
    heartbeat_interval: float = Field(0.5, gt=0.0, le=3600.0)
    heartbeat_timeout: float = Field(2.0, gt=0.0, le=86_400.0)
    collective_timeout: float = Field(30.0, gt=0.0, description="workers' collective timeout once training")
    startup_timeout: float = Field(
        120.0, gt=0.0, description="workers' collective timeout before an epoch's first step is committed"
    )
    barrier_timeout: float = Field(600.0, gt=0.0)
    progress_timeout: float = Field(
        10.0,
        gt=0.0,
        le=86_400.0,
        description="seconds a member's training may go without progress before it is evicted "
        "(heartbeat timeout < progress timeout < barrier timeout)",
    )
    restart_grace: float | None = Field(
        None,
        ge=0.0,
        description="extra seconds granted to every live worker after a restart (default: timeout)",
    )
    max_workers: int = Field(1024, ge=1, le=100_000)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    ready_wait_cap: float = Field(30.0, gt=0.0, le=600.0, description="longest wait of /training/ready")
    heartbeat_flush_interval: float = Field(1.0, gt=0.0, le=60.0)
    record_retention_s: float = Field(
        3600.0, gt=0.0, le=10 * 365 * 86_400.0, description="seconds dead and left worker records are kept"
    )
    register_rate: float = Field(
        5.0, ge=0.0, description="registrations per second per client address (0: off)"
    )
    register_burst: int = Field(64, ge=1, le=1_000_000)
    register_rate_global: float = Field(50.0, ge=0.0, description="registrations per second in all (0: off)")
    register_burst_global: int = Field(512, ge=1, le=1_000_000)

    @field_validator("token", "read_token", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        check_timeouts(
            self.heartbeat_interval,
            self.heartbeat_timeout,
            self.collective_timeout,
            self.startup_timeout,
            self.barrier_timeout,
        )
        check_nested_timeouts(
            [
                ("heartbeat timeout", self.heartbeat_timeout),
                ("progress timeout", self.progress_timeout),
                ("barrier timeout", self.barrier_timeout),
            ]
        )
        if not self.insecure_no_auth and (self.token is None or not self.token.get_secret_value()):
            raise ValueError(
                "a cluster token is required (--token or ZEROWIRE_TOKEN); --insecure-no-auth disables auth"
            )
        given: list[tuple[str, str]] = []
        for flag, field in (
            ("--token", "token"),
            ("--read-token", "read_token"),
            ("--admin-token", "admin_token"),
        ):
            value = self.secret(field)
            if value is not None:
                given.append((flag, value))
        for (flag_a, token_a), (flag_b, token_b) in itertools.combinations(given, 2):
            if token_a == token_b:
                raise ValueError(f"{flag_a} and {flag_b} must differ: each token grants different rights")
        return self

    @property
    def grace_s(self) -> float:
        return self.heartbeat_timeout if self.restart_grace is None else self.restart_grace

    @property
    def suspect_settle_s(self) -> float:
        """How long two members reporting each other wait for the others' reports before one leaves."""
        return self.heartbeat_timeout

    @property
    def reaper_tick_s(self) -> float:
        return min(0.25, self.heartbeat_interval / 2.0)

    @property
    def purge_every_s(self) -> float:
        """How often expired records are looked for: a tenth of the retention, between 1 s and a minute."""
        return min(60.0, max(1.0, self.record_retention_s / 10.0))

    def secret(self, name: str) -> str | None:
        """The value of token field `name` (None when unset)."""
        value: SecretStr | None = getattr(self, name)
        return value.get_secret_value() if value is not None else None
