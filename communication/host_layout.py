"""How an epoch's members sit on hosts, for the hierarchical backend: a pure function of the PeerGroup.

Hosts are ordered by their lowest rank and the members of a host by rank, so global rank g is
(host index h, local index l) whatever order the coordinator numbered them in (ranks need not be
host-major). Global shard ownership stays by global rank: rank g owns chunk g of every flat tensor.

With H hosts of L members each:
- the local group of rank (h, l) is host h's L members, local rank l; it meets through the rendezvous
  store of the host's lowest rank (`PeerGroup.store_addresses`), joined as a client;
- the remote group is the H members with local index l, ranked by host index, with the same job and
  epoch and this rank's data-plane keys re-indexed to them;
- "local-major" order lists the chunks of (0, 0), (1, 0), .., (H-1, 0), (0, 1), ..: local rank l's
  piece of a local reduce-scatter is the chunks owned by (h', l) for every host h', in host order, which
  the remote reduce-scatter then splits among them. All-gather runs the same way back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from communication.group import PeerGroup
from communication.torchdist_group import parse_rendezvous


@dataclass(frozen=True)
class HostLayout:
    group: PeerGroup
    hosts: tuple[tuple[int, ...], ...]  # global ranks per host; hosts by lowest rank, ranks ascending
    host: int  # this rank's host index h
    local: int  # this rank's local index l
    local_group: PeerGroup  # the L members of this host, ranked by local index
    remote_group: PeerGroup | None  # the H members with local index l (None with one host)
    rendezvous: str  # the local group's store: that of this host's lowest rank
    order: torch.Tensor  # int64, order[l * H + h] = global rank of (h, l)

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def per_host(self) -> int:
        return len(self.hosts[0])

    def to_local_major(self, full: torch.Tensor, n: int) -> torch.Tensor:
        """A new fp32 tensor: the chunks of `full` (global rank order, chunk numel n) in local-major order."""
        flat = full.detach().reshape(-1).to(torch.float32)
        return flat.view(-1, n).index_select(0, self.order.to(flat.device)).reshape(-1)

    def from_local_major(self, src: torch.Tensor, out: torch.Tensor, n: int) -> None:
        """Write the chunks of `src` (local-major order) into `out` (global rank order)."""
        chunks = src.view(-1, n).to(device=out.device, dtype=out.dtype)
        out.view(-1, n).index_copy_(0, self.order.to(out.device), chunks)


def host_layout(group: PeerGroup) -> HostLayout | str:
    """The layout of `group` when it is hierarchical (or all on one host), else why it is flat.

    ValueError when a needed rendezvous store address is malformed."""
    if not group.host_ids:
        return "no host ids"
    members: dict[str, list[int]] = {}
    for rank, host_id in enumerate(group.host_ids):
        members.setdefault(host_id, []).append(rank)  # ranks ascending; hosts by lowest rank
    hosts = tuple(tuple(ranks) for ranks in members.values())
    sizes = {len(ranks) for ranks in hosts}
    if sizes == {1}:
        return "one member per host"
    if len(sizes) > 1:
        counts = ", ".join(f"{h}={len(r)}" for h, r in members.items())
        return f"hosts of uneven size ({counts})"
    stores = [group.store_addresses[ranks[0]] if group.store_addresses else "" for ranks in hosts]
    if not all(stores):
        return "no rendezvous store address for the lowest rank of every host"
    for address in stores:
        parse_rendezvous(address)
    h = next(i for i, ranks in enumerate(hosts) if group.rank in ranks)
    mine = hosts[h]
    local = mine.index(group.rank)
    local_group = PeerGroup(
        group.job_id,
        group.epoch,
        local,
        tuple(group.addresses[r] for r in mine),
        tuple(group.host_ids[r] for r in mine),
    )
    remote_group = None
    if len(hosts) > 1:
        peers = [ranks[local] for ranks in hosts]
        remote_group = PeerGroup(
            group.job_id,
            group.epoch,
            h,
            tuple(group.addresses[r] for r in peers),
            tuple(group.host_ids[r] for r in peers),
            peer_keys={i: group.peer_keys[r] for i, r in enumerate(peers) if r in group.peer_keys},
        )
    order = torch.tensor([ranks[li] for li in range(len(mine)) for ranks in hosts], dtype=torch.int64)
    return HostLayout(group, hosts, h, local, local_group, remote_group, stores[h], order)
