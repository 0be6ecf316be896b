"""Which member a failed call points at: the worker id behind a lost peer's address, never this worker."""

from __future__ import annotations

from communication.errors import CollectiveTimeout, PeerLost
from communication.group import PeerGroup
from worker.formation import suspect_of

GROUP = PeerGroup("job", 4, 1, ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
IDS = ("a", "b", "c")


def lost(peer: str | None) -> PeerLost:
    exc = PeerLost("gone")
    exc.peer = peer
    return exc


def test_a_lost_peer_names_its_worker() -> None:
    assert suspect_of(lost("127.0.0.1:3"), GROUP, IDS) == "c"
    assert suspect_of(lost("127.0.0.1:1"), GROUP, IDS) == "a"


def test_no_suspect_without_evidence() -> None:
    assert suspect_of(lost(None), GROUP, IDS) is None  # no address known
    assert suspect_of(lost("127.0.0.1:2"), GROUP, IDS) is None  # this worker itself
    assert suspect_of(lost("10.0.0.9:1"), GROUP, IDS) is None  # not a member's address
    timeout = CollectiveTimeout("slow")
    timeout.peer = "127.0.0.1:3"
    assert suspect_of(timeout, GROUP, IDS) is None  # slowness is the progress timeout's business
