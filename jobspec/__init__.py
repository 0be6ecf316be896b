"""The job spec every worker trains: one pydantic model, a canonical hash, and TOML loading; and the
nesting rule of the timeouts that coordinator and workers both check.

Kept free of torch so the coordinator can import it cheaply.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Compression = Literal["none", "int8"]
ParamDtype = Literal["float32", "bfloat16", "float16"]
ImageAugment = Literal["none", "flip", "crop-flip", "rrc-flip"]
BadImages = Literal["fail", "skip"]
NcclReduce = Literal["ordered", "native"]


class JobSpec(BaseModel):
    """What to train. Identical on every worker; checked by hash before step 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(default="zerowire-job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = Field(
        default="resnet8",
        min_length=1,
        max_length=512,
        description="a built-in ResNet, or module:function, path/to/file.py:function, torchvision:NAME",
    )
    dataset: str = Field(default="digits", min_length=1, max_length=512)
    steps: int = Field(default=300, ge=1, le=10_000_000)
    global_batch: int = Field(default=64, ge=1, le=1_000_000)
    optimizer: Optimizer = "sgd"
    lr: float = Field(default=0.1, gt=0.0, le=100.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "cosine"
    warmup_steps: int = Field(
        default=10, ge=0, description="linear warm-up; when not given, min(10, steps // 10)"
    )
    step_size: int = Field(default=100, ge=1, description="for schedule=step: decay every N steps")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="for schedule=step: decay factor")
    grad_clip: float = Field(default=0.0, ge=0.0, description="clip by global norm; 0 disables")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    compression: Compression = "none"
    int8_block: int = Field(default=1024, ge=16, le=1 << 20)
    param_dtype: ParamDtype = Field(
        default="float32",
        description="compute precision of gathered parameters; shards, wire and gradient reduction stay fp32",
    )
    nccl_reduce: NcclReduce = Field(
        default="ordered",
        description="reduce-scatter among workers that share a host over NCCL: ordered (an all-to-all, then "
        "fp32 sums in rank order: deterministic, equal to the sequential sum) or native (NCCL's own "
        "reduce-scatter: one kernel and less memory, its order of summation); every co-located member "
        "must run the same one, so it is part of the job",
    )
    eval_every: int = Field(default=0, ge=0, description="evaluate every N steps; 0 = only at the end")
    checkpoint_every: int = Field(default=0, ge=0, description="checkpoint every N steps; 0 disables")
    replicas: int = Field(
        default=1,
        ge=0,
        le=1,
        description="buddy replicas per shard; 0: a lost worker costs a checkpoint",
    )
    min_workers: int = Field(default=1, ge=1, le=4096)
    # imagefolder datasets (worker.data.imagefolder); the other datasets ignore these
    image_size: int = Field(default=224, ge=8, le=4096, description="imagefolder: images are S x S")
    channels: int = Field(default=0, ge=0, le=3, description="imagefolder: 1 or 3; 0: from the first image")
    augment: ImageAugment = Field(default="rrc-flip", description="imagefolder: training augmentation")
    val_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="imagefolder without val/: the held-out share of train/"
    )
    bad_images: BadImages = Field(
        default="fail", description="imagefolder: a file that cannot be decoded stops the job, or is skipped"
    )

    @model_validator(mode="before")
    @classmethod
    def _adapt_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other fields: a warm-up not given is at most a tenth of the steps."""
        if isinstance(data, Mapping) and data.get("warmup_steps") is None:
            steps = data.get("steps", 300)
            if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
                return {**data, "warmup_steps": min(10, steps // 10)}
        return data

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) exceeds --steps ({self.steps})")
        if self.channels == 2:
            raise ValueError("--channels must be 1 or 3 (or 0: from the first image), got 2")
        return self

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON: workers refuse to train a job whose hash differs."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


class InvalidJob(ValueError):
    """A job refused, in one line that names each flag at fault and what it allows."""


def flag(field: str) -> str:
    """The command-line flag of a JobSpec field (``warmup_steps`` -> ``--warmup-steps``)."""
    return "--" + field.replace("_", "-")


def make_job(values: Mapping[str, Any]) -> JobSpec:
    """The JobSpec of ``values`` (fields by name); InvalidJob, one line, otherwise. The CLI and the Python
    API both build jobs here."""
    try:
        return JobSpec.model_validate(dict(values))
    except ValidationError as exc:
        raise InvalidJob(describe_errors(exc)) from None


def allowed(field: str) -> str:
    """What ``field`` allows, from its declared bounds (``an integer in 1..10000000``)."""
    info = JobSpec.model_fields[field]
    lo = hi = None
    for m in info.metadata:  # annotated_types' Ge, Gt, Le, Lt
        for attr, op in (("ge", ">="), ("gt", ">")):
            if getattr(m, attr, None) is not None:
                lo = f"{op} {getattr(m, attr)}"
        for attr, op in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                hi = f"{op} {getattr(m, attr)}"
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        info.annotation if isinstance(info.annotation, type) else object, "a value"
    )
    bounds = " and ".join(b for b in (lo, hi) if b)
    return f"{kind} {bounds}".strip()


def _one(err: Mapping[str, Any]) -> str:
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else ""
    got = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if not field:  # a rule over several fields (its message names their flags)
        return str(ctx.get("error", err.get("msg", "invalid job")))
    name = flag(field)
    if kind == "extra_forbidden":
        return f"{name}: no such job option"
    if field not in JobSpec.model_fields:
        return f"{name}: {err.get('msg')}"
    if kind == "literal_error":
        return f"{name} must be {ctx.get('expected')} (got {got!r})"
    if kind == "string_pattern_mismatch":
        return f"{name} may hold only letters, digits, '.', '_' and '-' (got {got!r})"
    if kind in ("string_too_short", "string_too_long"):
        meta = JobSpec.model_fields[field].metadata
        lo = next((m.min_length for m in meta if getattr(m, "min_length", None) is not None), 0)
        hi = next((m.max_length for m in meta if getattr(m, "max_length", None) is not None), None)
        return f"{name} must be {lo} to {hi} characters long (got {len(str(got))})"
    if kind in ("too_long", "too_short", "tuple_type"):
        return f"{name} must be two numbers B1,B2 (got {got!r})"
    return f"{name} must be {allowed(field)} (got {got!r})"


def describe_errors(exc: ValidationError) -> str:
    """A job's validation errors in one line: each names its flag and what the flag allows."""
    return "invalid job: " + "; ".join(_one(err) for err in exc.errors())


def load_job_file(path: str | Path) -> dict[str, object]:
    """Read a job TOML file (top-level keys or a [job] table) into a dict of JobSpec fields."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    table = data.get("job", data)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [job] must be a table")
    return dict(table)


def check_nested_timeouts(order: Sequence[tuple[str, float]], *, may_equal: Collection[str] = ()) -> None:
    """ValueError unless every named timeout is shorter than the next one (and the first is positive); a
    timeout named in ``may_equal`` may also equal the one before it."""
    chain = "".join(
        f"{' <= ' if n in may_equal else ' < '}{n} ({v:g} s)" if i else f"{n} ({v:g} s)"
        for i, (n, v) in enumerate(order)
    )
    if order and not order[0][1] > 0:
        raise ValueError(f"timeouts must be positive: {chain}")
    for (name_a, a), (name_b, b) in itertools.pairwise(order):
        if not (a <= b if name_b in may_equal else a < b):
            relation = "must not be longer than" if name_b in may_equal else "must be shorter than"
            raise ValueError(
                f"timeouts must nest: {name_a} ({a:g} s) {relation} {name_b} ({b:g} s); required: {chain}"
            )


def check_timeouts(
    heartbeat_interval: float, heartbeat_timeout: float, collective: float, startup: float, barrier: float
) -> None:
    """The nesting coordinator and workers both check (ValueError otherwise): heartbeat interval <
    heartbeat timeout < collective timeout <= startup timeout < barrier timeout."""
    order = [
        ("heartbeat interval", heartbeat_interval),
        ("heartbeat timeout", heartbeat_timeout),
        ("collective timeout", collective),
        ("startup timeout", startup),
        ("barrier timeout", barrier),
    ]
    check_nested_timeouts(order, may_equal={"startup timeout"})
