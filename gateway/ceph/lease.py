"""The one-writer lease of an RBD volume, as a pure state machine (no I/O, no clock of its own).

A host writes to an RBD image only while it holds the image's lease: a RADOS exclusive lock with
a duration, whose cookie is the host's id, renewed well before it lapses. The adapter
(gateway/ceph/leases.py) does the cluster calls and feeds their outcomes here as events; this
module says what state follows and when the next renewal is due. A host that cannot tell for
sure that it still holds the lease must treat it as lost: it never writes on a guess.

| state | event | next | meaning |
|---|---|---|---|
| none | taken | held | the lock was free (or lapsed) and is ours now |
| none | busy | none | another host holds it: the writable open is refused |
| none | superseded | fenced | at start: another host holds the lease this host was writing under |
| none | released | none | nothing to release |
| held | taken | held | already ours |
| held | renewed | held | the deadline moves on |
| held | renew-failed | held | the cluster did not answer; the old deadline stands |
| held | renew-refused, superseded | fenced | another host holds it now (ours lapsed) |
| held | expired | lost | no renewal succeeded before the deadline |
| held | released | none | unlocked: another host may take it |
| lost | taken | held | taken again (nobody else held it meanwhile) |
| lost | busy, renew-refused, superseded | fenced | someone else has it: our writer is fenced |
| lost | renew-failed, expired | lost | still unknown: retried every quarter of the duration |
| lost | released | none | forgotten |
| fenced | taken | held | the other host let it go; ours again (a fresh QSD node) |
| fenced | busy, renew-failed, renew-refused, superseded, expired | fenced | nothing changes |
| fenced | released | none | forgotten |

`fenced` means more than `lost`: another host took the lease this host wrote under, and in doing
so broke the image's exclusive lock (which blocklists this host's QSD client), so whatever this
host still has open on the image must be torn down, and nothing reopens it while the other host
holds the lease. The adapter acts on entering it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from gateway.errors import InternalError


class LeaseState(enum.Enum):
    NONE = "none"
    HELD = "held"
    LOST = "lost"
    FENCED = "fenced"


class LeaseEvent(enum.Enum):
    TAKEN = "taken"
    BUSY = "busy"
    RENEWED = "renewed"
    RENEW_FAILED = "renew-failed"
    RENEW_REFUSED = "renew-refused"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    RELEASED = "released"


S, E = LeaseState, LeaseEvent
TABLE: dict[tuple[LeaseState, LeaseEvent], LeaseState] = {
    (S.NONE, E.TAKEN): S.HELD,
    (S.NONE, E.BUSY): S.NONE,
    (S.NONE, E.SUPERSEDED): S.FENCED,
    (S.NONE, E.RELEASED): S.NONE,
    (S.HELD, E.TAKEN): S.HELD,
    (S.HELD, E.RENEWED): S.HELD,
    (S.HELD, E.RENEW_FAILED): S.HELD,
    (S.HELD, E.RENEW_REFUSED): S.FENCED,
    (S.HELD, E.SUPERSEDED): S.FENCED,
    (S.HELD, E.EXPIRED): S.LOST,
    (S.HELD, E.RELEASED): S.NONE,
    (S.LOST, E.TAKEN): S.HELD,
    (S.LOST, E.BUSY): S.FENCED,
    (S.LOST, E.RENEW_REFUSED): S.FENCED,
    (S.LOST, E.SUPERSEDED): S.FENCED,
    (S.LOST, E.RENEW_FAILED): S.LOST,
    (S.LOST, E.EXPIRED): S.LOST,
    (S.LOST, E.RELEASED): S.NONE,
    (S.FENCED, E.TAKEN): S.HELD,
    (S.FENCED, E.BUSY): S.FENCED,
    (S.FENCED, E.RENEW_FAILED): S.FENCED,
    (S.FENCED, E.RENEW_REFUSED): S.FENCED,
    (S.FENCED, E.SUPERSEDED): S.FENCED,
    (S.FENCED, E.EXPIRED): S.FENCED,
    (S.FENCED, E.RELEASED): S.NONE,
}
# Events that prove the lock is ours until now + duration.
CONFIRMING = frozenset({E.TAKEN, E.RENEWED})


def transition(state: LeaseState, event: LeaseEvent) -> LeaseState:
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise InternalError(f"lease: event {event.value} cannot happen in state "
                            f"{state.value}") from None


@dataclass(frozen=True)
class Lease:
    """One image's lease as this host sees it. Times are seconds on the caller's monotonic clock.

    `deadline` is when the lock lapses unless renewed: a confirming event at `now` sets it to
    now + duration (a safe bound: the OSD started counting after we sent the request). Renewals
    are due every `duration / RENEWALS` seconds, so several may fail before it lapses."""

    duration: float
    state: LeaseState = LeaseState.NONE
    deadline: float = 0.0
    confirmed: float = 0.0  # when a renewal last succeeded
    tried: float = 0.0  # when a lost lease was last looked at again

    RENEWALS = 4

    def on(self, event: LeaseEvent, now: float) -> Lease:
        state = transition(self.state, event)
        if event in CONFIRMING:
            return replace(self, state=state, deadline=now + self.duration, confirmed=now)
        return replace(self, state=state)

    def renew_due(self, now: float) -> bool:
        return self.state is LeaseState.HELD and now >= self.confirmed + (
            self.duration / self.RENEWALS)

    def retry_due(self, now: float) -> bool:
        """Lost: time to look again whether it can be taken back or another host has it (every
        quarter of the duration, counted from the last attempt, `tried`)."""
        return self.state is LeaseState.LOST and now >= self.tried + (
            self.duration / self.RENEWALS)

    def tried_at(self, now: float) -> Lease:
        return replace(self, tried=now)

    def lapsed(self, now: float) -> bool:
        """Held, but past its deadline: the EXPIRED event is due."""
        return self.state is LeaseState.HELD and now >= self.deadline

    @property
    def writable(self) -> bool:
        return self.state is LeaseState.HELD

    @property
    def fenced(self) -> bool:
        return self.state is LeaseState.FENCED
