"""Fleet membership: rendezvous ownership, settling, and what moves when boxes come and go."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from gatewayd.fleet.membership import Membership, rendezvous_owner

GATEWAYS = [f"0234567{n:04d}" for n in range(300)]


def online(box: str) -> bytes:
    return json.dumps({"status": "online", "gateway": box}).encode()


def test_the_owner_is_the_same_on_every_box_and_spreads_evenly():
    boxes = {"t1", "t2", "t3"}
    owners = [rendezvous_owner(g, boxes) for g in GATEWAYS]
    assert owners == [rendezvous_owner(g, set(sorted(boxes))) for g in GATEWAYS]
    shares = {box: owners.count(box) for box in boxes}
    assert all(70 < share < 130 for share in shares.values()), shares
    assert rendezvous_owner("x", set()) is None


def test_when_a_box_leaves_only_its_gateways_move_and_they_come_back_when_it_does():
    three, two = {"t1", "t2", "t3"}, {"t1", "t3"}
    before = {g: rendezvous_owner(g, three) for g in GATEWAYS}
    after = {g: rendezvous_owner(g, two) for g in GATEWAYS}
    moved = {g for g in GATEWAYS if before[g] != after[g]}
    assert moved == {g for g in GATEWAYS if before[g] == "t2"}
    assert {g: rendezvous_owner(g, three) for g in GATEWAYS} == before


def test_a_box_owns_nothing_until_settled_and_nothing_while_its_link_is_down():
    clock = Clock()
    fleet = Membership("t1", clock, settle=2.0)
    changes = []
    fleet.subscribe(lambda: changes.append((fleet.ready, sorted(fleet.live))))
    assert not any(fleet.owns(g) for g in GATEWAYS)
    fleet.link_up()
    fleet.status("t2", online("t2"))  # the retained statuses arrive while settling
    fleet.status("t3", online("t3"))
    fleet.status("t1", online("t1"))  # its own: ignored
    clock.advance(1.9)
    assert not any(fleet.owns(g) for g in GATEWAYS)
    clock.advance(0.1)
    assert fleet.ready and changes[-1] == (True, ["t1", "t2", "t3"])
    mine = {g for g in GATEWAYS if fleet.owns(g)}
    assert mine == {g for g in GATEWAYS if rendezvous_owner(g, {"t1", "t2", "t3"}) == "t1"}
    fleet.status("t2", b"offline")  # t2's last will: t1 takes some of t2's gateways
    assert mine < {g for g in GATEWAYS if fleet.owns(g)}
    fleet.link_down()
    assert not fleet.ready and not any(fleet.owns(g) for g in GATEWAYS)
    assert fleet.owner(GATEWAYS[0]) in {"t1", "t3"}  # the view stays; ownership waits


def test_status_payloads_words_objects_and_cleared():
    clock = Clock()
    fleet = Membership("t1", clock)
    fleet.status("t2", b"online")
    fleet.status("t3", json.dumps({"status": "online"}).encode())
    fleet.status("t4", json.dumps({"status": "offline"}).encode())
    fleet.status("t5", b"{not json")
    assert fleet.live == {"t1", "t2", "t3"}
    fleet.status("t3", b"")  # a cleared retained status
    assert fleet.live == {"t1", "t2"}
    count = fleet.changes
    fleet.status("t2", b"online")  # no change: no notification
    assert fleet.changes == count
