"""An attachment's lifecycle as a table: its states and the events that move it. No I/O.

The catalog stores a record's state as the enum's value ('attaching', 'mounted', 'failed' are
the strings gatewayd has always written); ABSENT is the lack of a record and is never stored.

  ABSENT     no attachment record.
  ATTACHING  a mount is under way: the record and its journal exist, steps are being taken.
  MOUNTED    RUN_DIR/rootfs/VOL is delivered, through a data path this gatewayd holds (its block
             view under the loop device or fuse2fs).
  FAILED     the data path died under the mount (fuse2fs exited on its own), or a teardown got
             only part of the way; the next umount or mount cleans up what the journal names.
  DETACHING  the verified teardown of a mounted volume is under way.
  ADOPTING   a restarted gatewayd checks a mount whose data path (the data plane's block view,
             the loop device, the kernel mount or fuse2fs) survived the restart.
  ADOPTED    that mount, checked and taken over: it serves and is torn down like a mounted one.

A record a gatewayd finds at start is adopted when its data path is whole, and torn down
(RESTART) otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from gateway.errors import InternalError


class UndefinedTransition(InternalError):
    """An attachment was asked for a transition its table does not define (a gateway bug)."""


class AttachmentState(StrEnum):
    ABSENT = "absent"
    ATTACHING = "attaching"
    MOUNTED = "mounted"
    FAILED = "failed"
    DETACHING = "detaching"
    ADOPTING = "adopting"
    ADOPTED = "adopted"


# The states in which RUN_DIR/rootfs/VOL is delivered and served.
SERVING = frozenset({AttachmentState.MOUNTED, AttachmentState.ADOPTED})


class AttachmentEvent(StrEnum):
    BEGIN = "begin"                    # a mount starts: the record with its first journal entry
    ATTACHED = "attached"              # every attach step is done
    ABORT = "abort"                    # an attach step failed; what the mount made is undone
    LOST = "lost"                      # the data path died under the mount (fuse2fs exited)
    DETACH = "detach"                  # umount, or a mount clearing an old record, starts
    DETACHED = "detached"              # the teardown is complete: the record goes
    DETACH_FAILED = "detach-failed"    # the verified detach failed; the manager keeps the
                                       # mount's handle, the next mount re-checks what stands
    CLEANUP_FAILED = "cleanup-failed"  # the mount is gone, but what came after (journal
                                       # leftovers, the window, the flush, the export) failed
    RESTART = "restart"                # a starting gatewayd found the record: tear it down
    ADOPT = "adopt"                    # (roadmap) a starting gatewayd found a mount to adopt
    VERIFIED = "verified"              # (roadmap) the adopted mount checked out


_S, _E = AttachmentState, AttachmentEvent

TRANSITIONS: Mapping[tuple[AttachmentState, AttachmentEvent], AttachmentState] = {
    (_S.ABSENT, _E.BEGIN): _S.ATTACHING,
    (_S.ATTACHING, _E.ATTACHED): _S.MOUNTED,
    (_S.ATTACHING, _E.ABORT): _S.ABSENT,
    # A record left attaching outside a mount (its undo could not remove it) is a failure.
    (_S.ATTACHING, _E.DETACH): _S.FAILED,

    (_S.MOUNTED, _E.LOST): _S.FAILED,
    (_S.MOUNTED, _E.DETACH): _S.DETACHING,

    (_S.DETACHING, _E.DETACH): _S.DETACHING,  # a teardown that stopped half-way, resumed
    (_S.DETACHING, _E.DETACHED): _S.ABSENT,
    (_S.DETACHING, _E.DETACH_FAILED): _S.MOUNTED,
    (_S.DETACHING, _E.CLEANUP_FAILED): _S.FAILED,

    # A failed attachment stays failed until it is gone.
    (_S.FAILED, _E.LOST): _S.FAILED,
    (_S.FAILED, _E.DETACH): _S.FAILED,
    (_S.FAILED, _E.DETACHED): _S.ABSENT,
    (_S.FAILED, _E.DETACH_FAILED): _S.FAILED,
    (_S.FAILED, _E.CLEANUP_FAILED): _S.FAILED,

    # Roadmap: adoption after a restart, for data paths that outlive gatewayd.
    (_S.MOUNTED, _E.ADOPT): _S.ADOPTING,
    (_S.ADOPTED, _E.ADOPT): _S.ADOPTING,
    (_S.ADOPTING, _E.VERIFIED): _S.ADOPTED,
    (_S.ADOPTING, _E.LOST): _S.FAILED,
    (_S.ADOPTED, _E.LOST): _S.FAILED,
    (_S.ADOPTED, _E.DETACH): _S.DETACHING,

    # Every stored state, at start: the block view died with the last gatewayd.
    (_S.ATTACHING, _E.RESTART): _S.ABSENT,
    (_S.MOUNTED, _E.RESTART): _S.ABSENT,
    (_S.FAILED, _E.RESTART): _S.ABSENT,
    (_S.DETACHING, _E.RESTART): _S.ABSENT,
    (_S.ADOPTING, _E.RESTART): _S.ABSENT,
    (_S.ADOPTED, _E.RESTART): _S.ABSENT,
}


def transition(state: AttachmentState, event: AttachmentEvent) -> AttachmentState:
    """The state `event` leads to from `state`; UndefinedTransition if the table has none."""
    found = TRANSITIONS.get((state, event))
    if found is None:
        raise UndefinedTransition(f"attachment: no transition for {event.value} in state "
                                  f"{state.value}")
    return found


def stored(value: str) -> AttachmentState:
    """A state as the catalog stores it. A value this version does not know (a newer gatewayd's)
    reads as FAILED: nothing is trusted of it, and it is torn down like any failure."""
    try:
        state = AttachmentState(value)
    except ValueError:
        return AttachmentState.FAILED
    return AttachmentState.FAILED if state is AttachmentState.ABSENT else state
