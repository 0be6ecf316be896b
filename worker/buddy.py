"""Buddy replicas: every rank's shard (parameters and optimizer state) is mirrored, exactly, on one other
rank, its *buddy*, which applies the same committed update every step.

Who mirrors whom is a pure function of the epoch's host ids (:func:`buddy_ranks`), a permutation in which
no rank is its own buddy, and the buddy sits on another host wherever one exists:

- hosts of equal size L > 1 (the hierarchical layout): the member with the same local index on the next
  host, so the buddy is reachable on the lane between hosts;
- one host: the next rank;
- otherwise (one member per host, uneven hosts, no host ids): the next rank in the order that takes the
  first member of every host, then the second of every host, and so on.

Each step a rank sends its reduced, averaged gradient shards to its buddy and receives those of its ward
(the rank it mirrors) before it votes; a rank that voted "staged" therefore holds everything needed to
apply its own update and its ward's (:class:`Replica`). Extra bytes per rank and step: one shard of fp32
gradients; extra memory: the ward's shard and optimizer state, kept in host memory whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from communication.backend import CollectiveBackend
from communication.group import PeerGroup
from communication.handle import Handle
from jobspec import JobSpec
from worker.zero3.optim import ShardedOptimizer


def buddy_ranks(host_ids: Sequence[str], world_size: int) -> list[int]:
    """``buddy[r]``: the rank that mirrors rank ``r``; ``[]`` for a world of one (nobody to mirror on)."""
    if world_size < 2:
        return []
    ids = list(host_ids) if len(host_ids) == world_size else [str(r) for r in range(world_size)]
    hosts: dict[str, list[int]] = {}
    for rank, host in enumerate(ids):
        hosts.setdefault(host, []).append(rank)
    groups = list(hosts.values())
    sizes = {len(g) for g in groups}
    buddy = [0] * world_size
    if len(groups) == 1:
        return [(r + 1) % world_size for r in range(world_size)]
    if len(sizes) == 1 and sizes != {1}:
        for h, ranks in enumerate(groups):
            for local, rank in enumerate(ranks):
                buddy[rank] = groups[(h + 1) % len(groups)][local]
        return buddy
    order = [g[i] for i in range(max(sizes)) for g in groups if i < len(g)]
    for i, rank in enumerate(order):
        buddy[rank] = order[(i + 1) % len(order)]
    return buddy


def sends_first(buddies: Sequence[int], rank: int) -> bool:
    """Whether ``rank`` sends to its buddy before it receives from its ward: only the lowest rank of each
    cycle of the permutation does, so lanes that run a rank's calls in order never wait in a circle."""
    cycle, r = [rank], buddies[rank]
    while r != rank:
        cycle.append(r)
        r = buddies[r]
    return rank == min(cycle)


def ward_of(buddies: Sequence[int], rank: int) -> int | None:
    """The rank that ``rank`` mirrors (None in a world of one)."""
    return buddies.index(rank) if buddies else None


class Replica:
    """The ward's shards and optimizer state, kept in step with the ward by applying the same updates."""

    def __init__(self, ward: int, shards: list[torch.Tensor], job: JobSpec) -> None:
        self.ward = ward
        self.shards = shards
        self.optimizer = ShardedOptimizer(shards, job)

    @classmethod
    def load(cls, ward: int, tensors: dict[str, torch.Tensor], units: int, job: JobSpec) -> Replica:
        """A replica from state tensors named as in checkpoints (``u{k}.param``, optimizer state, step)."""
        replica = cls(ward, [tensors[f"u{k}.param"].clone() for k in range(units)], job)
        replica.optimizer.load_state_tensors({k: v for k, v in tensors.items() if not k.endswith(".param")})
        return replica

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"u{k}.param": s for k, s in enumerate(self.shards)}
        out.update(self.optimizer.state_tensors())
        return out

    def apply(self, grads: list[torch.Tensor], step: int, clip_coef: float) -> None:
        self.optimizer.step(grads, step, clip_coef)


class GradExchange:
    """One step's buddy traffic: this rank's gradient shards to its buddy, the ward's from the ward."""

    def __init__(self, backend: CollectiveBackend, group: PeerGroup, timeout: float) -> None:
        self.backend = backend
        self.group = group
        self.timeout = timeout
        self.buddies = buddy_ranks(group.host_ids, group.world_size)
        self.buddy = self.buddies[group.rank] if self.buddies else None
        self.ward = ward_of(self.buddies, group.rank)

    def exchange(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor] | None:
        """Send ``grads`` (this rank's averaged shards) to the buddy and return the ward's (same sizes as
        the ward's shards, which are the same as ours in this layout); None in a world of one."""
        if self.buddy is None or self.ward is None:
            return None
        # one copy to host memory (where the replica lives) for all units, not one synchronous copy per unit
        flat = torch.cat([g.detach().reshape(-1) for g in grads]).to("cpu", torch.float32)
        got = torch.empty_like(flat)
        swap(self.backend, self.group, flat, got, self.buddies, step, self.timeout)  # p2p key: the step
        return list(got.split([g.numel() for g in grads]))  # host memory, as the replica lives


def swap(
    backend: CollectiveBackend,
    group: PeerGroup,
    mine: torch.Tensor,
    out: torch.Tensor,
    buddies: Sequence[int],
    key: int,
    timeout: float,
) -> None:
    """Send ``mine`` to this rank's buddy and receive the ward's into ``out`` (p2p ``key``)."""
    rank = group.rank
    ward = ward_of(buddies, rank)
    assert ward is not None
    calls: list[Handle] = []
    for sending in (True, False) if sends_first(buddies, rank) else (False, True):
        if sending:
            calls.append(backend.send(mine, group=group, dest=buddies[rank], key=key, timeout=timeout))
        else:
            calls.append(backend.recv(out, group=group, src=ward, key=key, timeout=timeout))
    for call in calls:
        call.wait(timeout)
