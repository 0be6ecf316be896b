"""Holding the cluster token (or another worker's secret) does not let anyone speak for a worker: each
impersonation is refused and leaves the listing, the epoch and the event history exactly as they were."""

from __future__ import annotations

from typing import Any

from coordinator.credentials import pair_key
from tests.unit.coordinator.conftest import ADMIN_TOKEN, READ_TOKEN, TOKEN, Api, bearer

HOME = {"host": "10.0.0.5", "port": 5000, "host_id": "m5", "device": "cpu"}
EVIL = {"host": "6.6.6.6", "port": 6666, "host_id": "evil", "device": "cpu"}


async def snapshot(api: Api) -> Any:
    workers = (await api.client.get("/workers")).json()
    for w in workers["workers"]:
        w.pop("last_heartbeat_age_s")
    events = (await api.client.get("/events")).json()["events"]
    status = (await api.client.get("/cluster/status")).json()
    return workers, len(events), status["state"], status["epoch"]


async def two_workers(api: Api) -> None:
    assert (await api.register("w0", **HOME)).status_code == 201
    assert (
        await api.register("w1", host="10.0.0.6", port=5001, host_id="m6", device="cpu")
    ).status_code == 201


async def test_a_live_worker_cannot_be_hijacked(api: Api) -> None:
    await two_workers(api)
    before = await snapshot(api)
    body = {"worker_id": "w0", **EVIL}
    attempts = [
        bearer(TOKEN),  # the cluster token alone
        bearer(TOKEN) | {"X-Worker-Secret": "guessed-secret"},
        bearer(TOKEN) | {"X-Worker-Secret": api.secrets["w1"]},  # another worker's secret
        bearer(TOKEN) | {"X-Worker-Secret": TOKEN},
        api.as_worker("w0"),  # the victim's own secret, but not the cluster token
        bearer(ADMIN_TOKEN) | {"X-Worker-Secret": api.secrets["w0"]},
    ]
    for headers in attempts:
        r = await api.client.post("/workers/register", json=body, headers=headers)
        assert r.status_code == 403, (headers, r.status_code, r.text)
    assert await snapshot(api) == before
    (w0,) = [w for w in before[0]["workers"] if w["worker_id"] == "w0"]
    assert (w0["host"], w0["port"]) == ("10.0.0.5", 5000)
    # the worker itself may move (its secret stays the same)
    r = await api.register("w0", host="10.0.0.7", port=5002, host_id="m7", device="cpu")
    assert r.status_code == 201 and r.json()["worker_secret"] == api.secrets["w0"]
    assert r.json()["epoch"] == before[3] + 1


async def test_a_worker_cannot_be_evicted_or_made_to_leave_by_others(api: Api) -> None:
    await two_workers(api)
    before = await snapshot(api)
    for headers, code in [
        ({"Authorization": ""}, 401),
        (bearer("nope"), 401),
        (bearer(TOKEN), 403),
        (bearer(READ_TOKEN), 403),
        (api.as_worker("w1"), 403),
    ]:
        assert (await api.client.delete("/workers/w0", headers=headers)).status_code == code, headers
    assert await snapshot(api) == before
    # the admin evicts: a new epoch, an `evicted` event, and the worker is told to stop
    assert (await api.client.delete("/workers/w0", headers=bearer(ADMIN_TOKEN))).status_code == 204
    events = (await api.client.get("/events")).json()["events"]
    assert [(e["kind"], e["worker_id"]) for e in events if e["kind"] == "evicted"] == [("evicted", "w0")]
    hb = await api.heartbeat("w0", before[3] + 1)
    assert hb.status_code == 200 and hb.json()["action"] == "stop"


async def test_heartbeats_for_another_worker_are_refused_and_cannot_finish_the_job(api: Api) -> None:
    await two_workers(api)
    assert (await api.heartbeat("w0", 2, state="training", step=5)).status_code == 200
    before = await snapshot(api)
    spoof = {"epoch": 2, "step": 999, "state": "finished", "loss": 0.0}
    for headers, code in [
        (bearer(TOKEN), 403),
        (api.as_worker("w1"), 403),
        (bearer(READ_TOKEN), 403),
        (bearer(ADMIN_TOKEN), 403),
        (bearer("forged"), 401),
        ({"Authorization": ""}, 401),
    ]:
        r = await api.client.post("/workers/w0/heartbeat", json=spoof, headers=headers)
        assert r.status_code == code, (headers, r.status_code)
    after = await snapshot(api)
    assert after == before and after[2] == "training"  # no sticky "finished", w0 still at step 5
    assert not api.service.state.finished


async def test_the_barrier_needs_a_worker_secret(api: Api) -> None:
    await two_workers(api)
    for token, code in [(TOKEN, 403), (READ_TOKEN, 403), (ADMIN_TOKEN, 403), ("nope", 401)]:
        assert (await api.client.get("/training/ready", headers=bearer(token))).status_code == code


async def test_a_dead_id_takes_the_cluster_token_and_a_fresh_secret(api: Api) -> None:
    await two_workers(api)
    old = api.secrets["w0"]
    api.clock.advance(1.5)
    assert (await api.heartbeat("w1", 2)).status_code == 200
    api.clock.advance(1.0)
    assert await api.service.expire()  # w0 is dead
    assert (await api.heartbeat("w0", 3)).status_code == 410  # its own secret: register again
    r = await api.register("w0", prove=False, **EVIL)
    assert r.status_code == 201 and r.json()["worker_secret"] != old
    # the old secret speaks for nobody now, the new one for w0
    r = await api.client.post("/workers/w0/heartbeat", json={"epoch": 4}, headers=bearer(old))
    assert r.status_code == 401
    assert (await api.client.get("/training/ready", headers=bearer(old))).status_code == 401
    assert (await api.heartbeat("w0", 4)).status_code == 200


async def test_a_dead_worker_registering_with_its_secret_keeps_it(api: Api) -> None:
    await two_workers(api)
    old = api.secrets["w0"]
    api.clock.advance(2.5)
    assert await api.service.expire()
    r = await api.register("w0", **HOME)  # proves the id with its secret
    assert r.status_code == 201 and r.json()["worker_secret"] == old


async def test_peer_keys_are_pairwise_and_only_for_members(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    master, job_id = api.service.master_key, api.service.job.job_id
    answers = {wid: (await api.ready(wid)).json() for wid in ("a", "b", "c")}
    assert {wid: sorted(a["peer_keys"]) for wid, a in answers.items()} == {
        "a": ["b", "c"],
        "b": ["a", "c"],
        "c": ["a", "b"],
    }
    for x in ("a", "b", "c"):
        for y, key in answers[x]["peer_keys"].items():
            assert key == answers[y]["peer_keys"][x] == pair_key(master, job_id, 3, x, y).hex()
    assert len({k for a in answers.values() for k in a["peer_keys"].values()}) == 3  # one key per pair
    assert (await api.leave("c")).status_code == 204
    assert (await api.ready("c")).json()["peer_keys"] == {}  # not a member of epoch 4
    new = (await api.ready("a")).json()
    assert new["epoch"] == 4 and list(new["peer_keys"]) == ["b"]
    assert new["peer_keys"]["b"] != answers["a"]["peer_keys"]["b"]  # keys change with the epoch
    # the master key is never served
    for path in ("/cluster/status", "/workers", "/events", "/metrics", "/job", "/openapi.json"):
        assert master.hex() not in (await api.client.get(path)).text
