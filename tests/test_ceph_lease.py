"""The writer lease state machine (gateway/ceph/lease.py): its table and its clock arithmetic,
without a cluster."""

from __future__ import annotations

import pytest

from gateway.ceph.lease import TABLE, Lease, LeaseEvent, LeaseState, transition
from gateway.errors import InternalError

pytestmark = pytest.mark.timeout(10)
S, E = LeaseState, LeaseEvent


def test_every_state_answers_take_and_release() -> None:
    for state in LeaseState:
        assert (state, E.TAKEN) in TABLE or state is S.NONE
        assert transition(state, E.RELEASED) is S.NONE
    assert transition(S.NONE, E.TAKEN) is S.HELD


def test_impossible_events_are_bugs() -> None:
    for event in (E.RENEWED, E.RENEW_FAILED, E.RENEW_REFUSED, E.EXPIRED):
        with pytest.raises(InternalError, match="cannot happen"):
            transition(S.NONE, event)
    with pytest.raises(InternalError):
        transition(S.LOST, E.RENEWED)


def test_a_busy_lease_is_never_writable() -> None:
    lease = Lease(duration=20).on(E.BUSY, now=5)
    assert lease.state is S.NONE and not lease.writable
    assert not lease.renew_due(100) and not lease.lapsed(100)


def test_held_lease_renews_every_quarter_and_lapses_at_its_deadline() -> None:
    lease = Lease(duration=20).on(E.TAKEN, now=100)
    assert lease.writable and lease.deadline == 120
    assert not lease.renew_due(104.9) and lease.renew_due(105)
    failed = lease.on(E.RENEW_FAILED, now=105)
    assert failed.writable and failed.deadline == 120  # a failure does not move the deadline
    assert failed.lapsed(120) and not failed.lapsed(119.9)
    renewed = failed.on(E.RENEWED, now=110)
    assert renewed.deadline == 130 and not renewed.renew_due(114) and renewed.renew_due(115)


def test_lost_lease_is_retried_and_stays_lost_until_taken_again() -> None:
    lost = Lease(duration=20).on(E.TAKEN, now=0).on(E.EXPIRED, now=20)
    assert lost.state is S.LOST and not lost.writable and not lost.renew_due(1000)
    for event in (E.RENEW_FAILED, E.EXPIRED):
        assert lost.on(event, now=30).state is S.LOST
    tried = lost.tried_at(20)
    assert not tried.retry_due(24.9) and tried.retry_due(25)
    again = lost.on(E.TAKEN, now=40)
    assert again.writable and again.deadline == 60 and not again.retry_due(1000)


def test_another_host_holding_it_fences() -> None:
    held = Lease(duration=20).on(E.TAKEN, now=0)
    lost = held.on(E.EXPIRED, now=20)
    for start, event in ((held, E.RENEW_REFUSED), (held, E.SUPERSEDED), (lost, E.BUSY),
                         (lost, E.RENEW_REFUSED), (lost, E.SUPERSEDED)):
        fenced = start.on(event, now=30)
        assert fenced.fenced and not fenced.writable and not fenced.renew_due(1000)
        assert not fenced.retry_due(1000) and not fenced.lapsed(1000)
    # At start: the host was writing the image before, and another host holds it now.
    assert Lease(duration=20).on(E.SUPERSEDED, now=1).fenced
    assert Lease(duration=20).on(E.BUSY, now=1).state is S.NONE  # never held: not fenced
    fenced = held.on(E.RENEW_REFUSED, now=5)
    for event in (E.BUSY, E.RENEW_FAILED, E.RENEW_REFUSED, E.SUPERSEDED, E.EXPIRED):
        assert fenced.on(event, now=6).fenced  # nothing but a take or a release ends it
    assert fenced.on(E.TAKEN, now=7).writable
    assert fenced.on(E.RELEASED, now=7).state is S.NONE
