"""The export lifecycle as a table: states, the verbs that move an export, and what each does.

No I/O: `transition(state, event)` looks a verb up in TRANSITIONS and names the actions the
export manager runs (gateway/export/manager.py), in two groups:
  before  may refuse (an error leaves the state as it was; a standby handed in is closed);
  after   run once the export is in its new state, every one even if another fails (the first
          failure is raised at the end), like the `finally` of a teardown.

One export per volume:
  ABSENT   the gateway holds no export of the volume (the catalog may still want one, before the
           start-up restore; `unexport` still asks QSD to drop a leftover).
  SERVING  exported by QSD, connected, in the block view, and desired: the catalog lists it, so a
           restarted QSD or gatewayd brings it back.
  IDLE     the mount that made it is gone and it lingers for `--export-linger` seconds: still open,
           no longer desired, maybe holding that mount's loop device as a standby.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import NamedTuple

from gateway.errors import InternalError


class UndefinedTransition(InternalError):
    """An export was asked for a transition its table does not define (a gateway bug)."""


class ExportState(StrEnum):
    ABSENT = "absent"
    SERVING = "serving"
    IDLE = "idle"


class ExportEvent(StrEnum):
    OPEN = "open"                # a user needs it: gatewayctl export, resize, the start-up restore
    CLAIM = "claim"              # a mount needs it, and takes an idle export's standby back
    RELEASE = "release"          # the mount that made it is gone and exports linger: go idle
    RELEASE_NOW = "release-now"  # the mount that made it is gone and nothing lingers: close it
    RETIRE = "retire"            # something needs the image file: close it if it only lingers
    EXPIRE = "expire"            # the linger timer of this idle period ran out
    CLOSE = "close"              # gatewayctl unexport, or a user's own export done with
    SHUTDOWN = "shutdown"        # gatewayd stops: close, but stay desired for the next start
    QSD_RESTART = "qsd-restart"  # QSD came back without it (idle exports are not re-added)


# What each action does (the export manager runs them by name).
ACTIONS: Mapping[str, str] = {
    "connect": "QSD export with the pinned chain, NBD connection, block view entry, catalog "
               "wants it; undone on failure",
    "want": "the catalog lists the export as desired",
    "forget": "the catalog no longer lists the export",
    "flush": "flush the gateway's connection",
    "unview": "remove the volume from the block view (refuses while its files are open)",
    "hang-up": "close the gateway's NBD connection",
    "unexport": "remove the export from QSD (nothing if it is not there)",
    "close-given": "close the standby the releasing mount handed in",
    "close-standby": "close the idle period's standby",
    "drop-standby": "close the idle period's standby and the rootfs window it served",
    "hand-standby": "give the idle period's standby to the claiming mount",
    "expire-later": "start this idle period's linger timer (it fires EXPIRE)",
}


class Transition(NamedTuple):
    state: ExportState
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


_A, _S, _I = ExportState.ABSENT, ExportState.SERVING, ExportState.IDLE
_E = ExportEvent
_SHUT = ("flush", "hang-up", "unexport")  # after "unview": the export is gone
_CLOSE = (*_SHUT, "forget")

TRANSITIONS: Mapping[tuple[ExportState, ExportEvent], Transition] = {
    (_A, _E.OPEN): Transition(_S, ("connect",)),
    (_A, _E.CLAIM): Transition(_S, ("connect",)),
    (_A, _E.RELEASE): Transition(_A, ("close-given",), ("forget", "unexport")),
    (_A, _E.RELEASE_NOW): Transition(_A, ("close-given",), ("forget", "unexport")),
    (_A, _E.RETIRE): Transition(_A),
    (_A, _E.CLOSE): Transition(_A, (), ("forget", "unexport")),
    (_A, _E.SHUTDOWN): Transition(_A, (), ("unexport",)),

    (_S, _E.OPEN): Transition(_S),
    (_S, _E.CLAIM): Transition(_S),
    (_S, _E.RELEASE): Transition(_I, ("flush",), ("forget", "expire-later")),
    (_S, _E.RELEASE_NOW): Transition(_A, ("close-given", "unview"), _CLOSE),
    (_S, _E.RETIRE): Transition(_S),
    (_S, _E.CLOSE): Transition(_A, ("unview",), _CLOSE),
    (_S, _E.SHUTDOWN): Transition(_A, ("unview",), _SHUT),

    (_I, _E.OPEN): Transition(_S, ("want",), ("drop-standby",)),
    (_I, _E.CLAIM): Transition(_S, ("want", "hand-standby")),
    # A second release without a claim between (no caller does that): the new standby wins.
    (_I, _E.RELEASE): Transition(_I, ("close-standby", "flush"), ("forget", "expire-later")),
    (_I, _E.RELEASE_NOW): Transition(_A, ("close-given", "close-standby", "unview"), _CLOSE),
    (_I, _E.RETIRE): Transition(_A, ("close-standby", "unview"), _CLOSE),
    (_I, _E.EXPIRE): Transition(_A, ("close-standby", "unview"), _CLOSE),
    (_I, _E.CLOSE): Transition(_A, ("close-standby", "unview"), _CLOSE),
    (_I, _E.SHUTDOWN): Transition(_A, ("close-standby", "unview"), _SHUT),
    (_I, _E.QSD_RESTART): Transition(_A, ("close-standby", "unview"), _CLOSE),
}
# Left undefined on purpose: EXPIRE and QSD_RESTART outside IDLE. A linger timer belongs to one
# idle period, and a QSD restart only loses exports nobody wants (a desired one is re-added).


def transition(state: ExportState, event: ExportEvent) -> Transition:
    """The table's entry for `event` in `state`; UndefinedTransition if it has none."""
    found = TRANSITIONS.get((state, event))
    if found is None:
        raise UndefinedTransition(f"export: no transition for {event.value} in state "
                                  f"{state.value}")
    return found
