"""Sharded checkpoints: one safetensors file and one JSON manifest per rank, loadable at any world size.

Layout (``step`` = steps completed, i.e. the first step to run after resuming)::

    DIR/step-000120/rank-00001-of-00003.safetensors   tensors of rank 1 of 3
    DIR/step-000120/rank-00001-of-00003.json          its manifest (epoch, step, world size, sha256, ...)

Tensor names: ``u{k}.param`` is the rank's flat shard of unit k, ``u{k}.<state>`` an optimizer-state tensor
of the same layout (both are *sharded*); any other name (``buffer.<name>``, ``step``, ...) is *replicated*:
rank 0's copy is the one loaded. Unit k with ``n`` elements is padded to ``ceil(n / N) * N`` and rank r holds
elements ``[r * n_pad / N, (r + 1) * n_pad / N)``; the padding is zero.

Each file is written to a temporary name, flushed and fsynced, renamed into place, and the directory is
fsynced; the manifest (which carries the sha256 of the tensor file) is written the same way *after* the tensor
file, so a part exists only once both are durable. A checkpoint is complete iff all N parts of one world size
exist, agree with each other and match their checksums. Loading never returns a partial result: any missing,
corrupt or mismatched part raises ``CheckpointError``. Re-sharding for another world size is
``worker.zero3.reshard``; every rank reads every part then, so the directory must be visible to all ranks
(same host or a shared file system).

Fencing: every manifest carries the membership ``epoch`` of the group that wrote it, and the N parts of a
complete checkpoint all carry the same one (manifests of format v1, without an epoch, are not parts). A
writer refuses (``CheckpointError``) to replace a part whose manifest carries a newer epoch, checked before
each rename, so a worker of an old epoch that writes late loses; should it race past that check, the part
no longer matches the others' epoch or its checksum, and the checkpoint is incomplete, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from worker.zero3.durable import fsync_dir, sha256_file, write_atomic
from worker.zero3.plan import shard_range

logger = logging.getLogger(__name__)

FORMAT = "zerowire-shard-checkpoint"
VERSION = 2  # 2: manifests carry the membership epoch
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MANIFEST = re.compile(r"^rank-(\d+)-of-(\d+)\.json$")
_SHARDED = re.compile(r"^u(\d+)\.(.+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or belongs to another job or model."""


class _MixedEpochs(CheckpointError):
    """The parts of one world size come from different membership epochs."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete, verified checkpoint: ``step`` steps done, saved by ``world_size`` ranks of ``epoch``."""

    path: Path
    step: int
    world_size: int
    epoch: int
    job_hash: str
    unit_numels: tuple[int, ...]
    extra: dict[str, Any] = field(compare=False, hash=False)
    sha256: tuple[str, ...] = field(compare=False)


def step_dir(directory: Path | str, step: int) -> Path:
    return Path(directory) / f"step-{step:06d}"


def part_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _check_sharded(name: str, t: torch.Tensor, unit_numels: list[int], world_size: int) -> None:
    m = _SHARDED.match(name)
    if m is None:
        return
    k = int(m.group(1))
    if k >= len(unit_numels):
        raise ValueError(f"tensor {name!r}: unit {k} does not exist ({len(unit_numels)} units)")
    start, stop = shard_range(unit_numels[k], world_size, 0)
    if t.dim() != 1 or t.numel() != stop - start:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(t.shape)}, expected a 1-D shard of {stop - start}"
        )


def save_shards(
    directory: Path | str,
    step: int,
    rank: int,
    world_size: int,
    job_hash: str,
    unit_numels: list[int],
    tensors: dict[str, torch.Tensor],
    extra: dict[str, Any],
    *,
    epoch: int,
) -> Path:
    """Write this rank's part of the checkpoint of ``step``, written by membership ``epoch``.

    Returns the manifest path. ``extra`` must be JSON-serialisable (stored in the manifest; rank 0's is
    exposed as ``CheckpointInfo.extra``). Bad input raises ``ValueError`` before anything is written; a part
    already written by a newer epoch raises ``CheckpointError`` and is left as it is.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not _is_epoch(epoch):
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if not job_hash:
        raise ValueError("job_hash must be non-empty")
    if any(n < 0 for n in unit_numels):
        raise ValueError(f"unit numels must be >= 0: {unit_numels}")
    for name, t in tensors.items():
        _check_sharded(name, t, unit_numels, world_size)
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra is not JSON-serialisable: {e}") from e
    # Clone: safetensors refuses tensors that share storage (shards may be views of one buffer).
    payload = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    data = save_safetensors_bytes(payload)
    digest = hashlib.sha256(data).hexdigest()

    out = step_dir(directory, step)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_dir(out.parent)
    base = part_name(rank, world_size)
    manifest_path = out / f"{base}.json"
    _refuse_if_newer(manifest_path, epoch)
    write_atomic(out / f"{base}.safetensors", data)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": epoch,
        "step": step,
        "world_size": world_size,
        "rank": rank,
        "job_hash": job_hash,
        "unit_numels": list(unit_numels),
        "padded_numels": [-(-n // world_size) * world_size for n in unit_numels],
        "file": f"{base}.safetensors",
        "bytes": len(data),
        "sha256": digest,
        "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in payload.items()},
        "extra": extra_json,
    }
    _refuse_if_newer(manifest_path, epoch)
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    logger.info("checkpoint step %d: rank %d/%d of epoch %d wrote %s", step, rank, world_size, epoch, out)
    return manifest_path


def _is_epoch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse_if_newer(manifest_path: Path, epoch: int) -> None:
    """Raise if the part at ``manifest_path`` was written by an epoch newer than ``epoch``."""
    try:
        existing = _read_manifest(manifest_path)["epoch"] if manifest_path.exists() else -1
    except CheckpointError:
        return  # not a part (unreadable or of another format): may be replaced
    if existing > epoch:
        raise CheckpointError(f"{manifest_path}: epoch {existing} wrote it, newer than epoch {epoch}: kept")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        old = isinstance(m, dict) and m.get("version") == 1
        why = " (v1 manifests carry no membership epoch)" if old else ""
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} manifest{why}")
    if not _is_epoch(m.get("epoch")):
        raise CheckpointError(f"{path}: manifest has no valid membership epoch: {m.get('epoch')!r}")
    return m


def _verify_parts(directory: Path, world_size: int, check_data: bool) -> CheckpointInfo:
    """All parts of ``world_size`` in a step directory, consistent and (if ``check_data``) checksummed."""
    manifests = []
    for rank in range(world_size):
        path = directory / f"{part_name(rank, world_size)}.json"
        if not path.exists():
            raise CheckpointError(f"{directory}: part {rank} of {world_size} is missing ({path.name})")
        manifests.append(_read_manifest(path))
    epochs = [m["epoch"] for m in manifests]
    if len(set(epochs)) > 1:
        raise _MixedEpochs(f"{directory}: the {world_size} parts come from epochs {epochs} (by rank)")
    first = manifests[0]
    for rank, m in enumerate(manifests):
        for key in ("step", "world_size", "job_hash", "unit_numels"):
            if m.get(key) != first.get(key):
                raise CheckpointError(f"{directory}: part {rank} disagrees with part 0 on {key!r}")
        if m.get("rank") != rank or m.get("world_size") != world_size:
            raise CheckpointError(f"{directory}: manifest of part {rank} names rank {m.get('rank')}")
        if m.get("file") != f"{part_name(rank, world_size)}.safetensors":
            raise CheckpointError(f"{directory}: manifest of part {rank} names file {m.get('file')!r}")
        if check_data:
            data_path = directory / f"{part_name(rank, world_size)}.safetensors"
            if not data_path.exists():
                raise CheckpointError(
                    f"{directory}: tensor file of part {rank} is missing ({data_path.name})"
                )
            if sha256_file(data_path) != m.get("sha256"):
                raise CheckpointError(f"{data_path}: sha256 mismatch (corrupt or partially written)")
    return CheckpointInfo(
        path=directory,
        step=int(first["step"]),
        world_size=world_size,
        epoch=int(first["epoch"]),
        job_hash=str(first["job_hash"]),
        unit_numels=tuple(int(n) for n in first["unit_numels"]),
        extra=dict(first.get("extra") or {}),
        sha256=tuple(str(m["sha256"]) for m in manifests),
    )


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _worlds(path: Path) -> list[int]:
    """The world sizes of the manifests in a step directory."""
    return sorted({int(m.group(2)) for p in path.iterdir() if (m := _MANIFEST.match(p.name))})


def _complete_in(path: Path, job_hash: str | None, verify: bool) -> CheckpointInfo | None:
    for world_size in _worlds(path):
        try:
            info = _verify_parts(path, world_size, check_data=verify)
        except _MixedEpochs as e:
            logger.warning("checkpoint %s is not complete: %s", path, e)
            continue
        except CheckpointError as e:
            logger.debug("checkpoint %s at world size %d is not complete: %s", path, world_size, e)
            continue
        if job_hash is not None and info.job_hash != job_hash:
            logger.warning("checkpoint %s belongs to another job (hash %s)", path, info.job_hash[:12])
            continue
        return info
    return None


def latest_complete(
    directory: Path | str, job_hash: str | None = None, *, verify: bool = True
) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``directory`` (of ``job_hash`` when given), or None.

    With ``verify`` every part's sha256 is checked, so a corrupt newest checkpoint falls back to an older one.
    """
    for _, path in _step_dirs(Path(directory)):
        info = _complete_in(path, job_hash, verify)
        if info is not None:
            return info
    return None


def resolve(source: Path | str | CheckpointInfo, job_hash: str) -> CheckpointInfo:
    """``source`` as a verified checkpoint: a ``CheckpointInfo`` as it is, a step directory, or a checkpoint
    root (its newest complete checkpoint of ``job_hash``)."""
    if isinstance(source, CheckpointInfo):
        return source
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if _STEP_DIR.match(path.name):
        worlds = _worlds(path)
        if not worlds:
            raise CheckpointError(f"{path}: no manifests")
        errors = []
        for world_size in worlds:
            try:
                return _verify_parts(path, world_size, check_data=False)
            except CheckpointError as e:
                errors.append(str(e))
        raise CheckpointError("; ".join(errors))
    info = latest_complete(path, job_hash)
    if info is None:
        raise CheckpointError(f"{path}: no complete checkpoint for job hash {job_hash[:12]}")
    return info


def read_part(info: CheckpointInfo, old_rank: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Part ``old_rank`` of ``info``: its path and tensors, checked against the part's epoch and sha256 on
    the very bytes loaded (``CheckpointError`` otherwise)."""
    manifest = _read_manifest(info.path / f"{part_name(old_rank, info.world_size)}.json")
    data_path = info.path / f"{part_name(old_rank, info.world_size)}.safetensors"
    try:
        data = data_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{data_path}: unreadable: {e}") from e
    if manifest["epoch"] != info.epoch:
        raise CheckpointError(f"{data_path}: part replaced by epoch {manifest['epoch']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.get("sha256") or digest != info.sha256[old_rank]:
        raise CheckpointError(f"{data_path}: sha256 mismatch (corrupt or replaced)")
    try:
        return data_path, load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"{data_path}: not a valid safetensors file: {e}") from e


def sharded_unit(name: str) -> int | None:
    """The unit index of a sharded tensor name (``u{k}.<what>``), None for a replicated one."""
    m = _SHARDED.match(name)
    return None if m is None else int(m.group(1))


def prune(directory: Path | str, keep: int = 2) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; returns the step directories removed.

    Removed: every directory older than the oldest kept one, and incomplete (crashed or corrupt) directories
    older than the newest complete one. Directories newer than the newest complete checkpoint (possibly still
    being written by other ranks) are never touched. Checksums are verified, so a corrupt checkpoint does not
    count as one of the ``keep``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    kept: list[int] = []
    removed: list[Path] = []
    for step, path in _step_dirs(Path(directory)):
        if len(kept) < keep:
            if _complete_in(path, None, verify=True) is not None:
                kept.append(step)
                continue
            if not kept:
                continue  # newer than any complete checkpoint: may be in progress
        shutil.rmtree(path)
        removed.append(path)
    if removed:
        fsync_dir(Path(directory))
        logger.info("pruned %d checkpoint directories under %s (kept %s)", len(removed), directory, kept)
    return removed
