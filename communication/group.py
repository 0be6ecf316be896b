"""PeerGroup: the explicit, immutable membership every collective names. There is no default group."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PeerGroup:
    """One membership epoch of one job, as seen by one rank.

    `addresses[r]` is rank r's advertised gRPC address ("host:port"); `host_ids[r]` names its machine
    (equal host ids mean co-located workers, which may use the torch.distributed fast path).
    `peer_keys[r]` is this rank's data-plane key with rank r in this epoch (from the coordinator's barrier
    answer; empty when it handed out none). Secret: left out of repr and comparisons.
    `store_addresses[r]` is the "host:port" of the rendezvous store rank r hosts for its host's
    torch.distributed groups ("" when it hosts none; the tuple is empty when no member reported one).
    """

    job_id: str
    epoch: int
    rank: int
    addresses: tuple[str, ...]
    host_ids: tuple[str, ...] = ()
    peer_keys: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False)
    store_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("PeerGroup needs a job_id")
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if not self.addresses:
            raise ValueError("PeerGroup needs at least one address")
        if not 0 <= self.rank < len(self.addresses):
            raise ValueError(f"rank {self.rank} outside world of size {len(self.addresses)}")
        if self.host_ids and len(self.host_ids) != len(self.addresses):
            raise ValueError("host_ids and addresses differ in length")
        if self.store_addresses and len(self.store_addresses) != len(self.addresses):
            raise ValueError("store_addresses and addresses differ in length")

    @property
    def world_size(self) -> int:
        return len(self.addresses)

    def peers(self) -> range:
        return range(self.world_size)

    def describe(self) -> str:
        return f"job={self.job_id} epoch={self.epoch} rank={self.rank}/{self.world_size}"
