"""QMP (QEMU Machine Protocol) as a sans-I/O state machine.

Bytes go in with `receive_data`, events come out of `next_events`; commands become bytes with
`send_command`. Nothing here touches a socket, so the tests feed it byte by byte.

The wire format is one JSON object per line (QEMU ends lines with CRLF). The server speaks first
with a greeting; the client must then run `qmp_capabilities` before any other command. Afterwards
the server sends returns and errors (carrying the client's `id`) and asynchronous events in any
order.

States and the events each state accepts are in `_TRANSITIONS`; anything else is a protocol error
and the connection becomes unusable (state FAILED). Errors: QMPError (QEMU refused a command) and
QMPProtocolError (the peer broke QMP) are backend errors; LocalProtocolError (this side drove the
core out of order) is an InternalError.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from gateway.errors import BackendError, InternalError

MAX_LINE = 64 * 1024 * 1024  # query-qmp-schema is ~200 KiB; anything this long is garbage


class QMPError(BackendError):
    """QEMU refused a command: `error_class` (e.g. GenericError) and QEMU's description."""

    def __init__(self, error_class: str, desc: str, *, command: str | None = None) -> None:
        where = f"qemu: {command}: " if command else "qemu: "
        super().__init__(f"{where}{desc} ({error_class})")
        self.error_class = error_class
        self.desc = desc
        self.command = command


class QMPProtocolError(BackendError):
    """The peer broke QMP (garbage, a reply to no command, a line too long)."""


class LocalProtocolError(InternalError):
    """This side used the core wrongly (a command before negotiation, after failure): a bug in
    the caller, reported as `internal`, never as a backend failure."""


class State(enum.Enum):
    GREETING = "greeting"        # waiting for the server's greeting
    NEGOTIATING = "negotiating"  # qmp_capabilities may be / has been sent, reply pending
    READY = "ready"              # commands may be sent
    FAILED = "failed"            # protocol error or negotiation refused; nothing more is accepted


# --- events the core produces -------------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    version: Mapping[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Ready:
    """qmp_capabilities succeeded; commands may now be sent."""

    id: str


@dataclass(frozen=True)
class Return:
    id: str
    command: str
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    id: str | None  # None: QEMU could not parse a command enough to find its id
    command: str | None
    error: QMPError


@dataclass(frozen=True)
class Event:
    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float | None = None


QMPEvent = Greeting | Ready | Return | ErrorReply | Event


class _Kind(enum.Enum):
    GREETING = "greeting"
    CAPS_RETURN = "caps-return"
    CAPS_ERROR = "caps-error"
    RETURN = "return"
    ERROR = "error"
    EVENT = "event"


# (state, kind of message received) -> next state. Missing pairs are protocol errors.
_TRANSITIONS: dict[tuple[State, _Kind], State] = {
    (State.GREETING, _Kind.GREETING): State.NEGOTIATING,
    (State.NEGOTIATING, _Kind.CAPS_RETURN): State.READY,
    (State.NEGOTIATING, _Kind.CAPS_ERROR): State.FAILED,
    (State.NEGOTIATING, _Kind.EVENT): State.NEGOTIATING,
    (State.READY, _Kind.RETURN): State.READY,
    (State.READY, _Kind.ERROR): State.READY,
    (State.READY, _Kind.EVENT): State.READY,
}

# which states allow which outgoing command ("caps" = qmp_capabilities, "cmd" = anything else)
_MAY_SEND: dict[State, frozenset[str]] = {
    State.GREETING: frozenset(),
    State.NEGOTIATING: frozenset({"caps"}),
    State.READY: frozenset({"cmd"}),
    State.FAILED: frozenset(),
}

CAPABILITIES = "qmp_capabilities"


class QMPConnection:
    """One client side of a QMP connection, without I/O."""

    def __init__(self, *, id_prefix: str = "gw") -> None:
        self.state = State.GREETING
        self._buffer = bytearray()
        self._scan_from = 0
        self._counter = 0
        self._prefix = id_prefix
        self._pending: dict[str, str] = {}  # id -> command name
        self._caps_id: str | None = None
        self.greeting: Greeting | None = None

    # ---- outgoing ------------------------------------------------------------------------------

    def send_command(self, command: str,
                     arguments: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
        """Encode a command; returns (id, bytes to write)."""
        kind = "caps" if command == CAPABILITIES else "cmd"
        if kind not in _MAY_SEND[self.state]:
            raise LocalProtocolError(f"qmp: cannot send {command!r} in state {self.state.value}")
        if kind == "caps" and self._caps_id is not None:
            raise LocalProtocolError("qmp: qmp_capabilities already sent")
        self._counter += 1
        cid = f"{self._prefix}-{self._counter}"
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = dict(arguments)
        if kind == "caps":
            self._caps_id = cid
        self._pending[cid] = command
        return cid, json.dumps(msg, separators=(",", ":")).encode() + b"\n"

    def negotiate(self) -> bytes:
        """The qmp_capabilities command to send right after the greeting."""
        return self.send_command(CAPABILITIES)[1]

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    # ---- incoming ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is State.FAILED:
            raise LocalProtocolError("qmp: connection already failed")
        self._buffer += data

    def next_events(self) -> list[QMPEvent]:
        """Every complete message received so far, decoded. Raises QMPProtocolError on garbage."""
        out: list[QMPEvent] = []
        while True:
            nl = self._buffer.find(b"\n", self._scan_from)
            if nl < 0:
                self._scan_from = len(self._buffer)
                if len(self._buffer) > MAX_LINE:
                    self._fail("qmp: line too long")
                return out
            line = bytes(self._buffer[:nl]).strip()
            del self._buffer[: nl + 1]
            self._scan_from = 0
            if line:
                out.extend(self._handle_line(line))

    def _fail(self, why: str) -> NoReturn:
        self.state = State.FAILED
        raise QMPProtocolError(why)

    def _handle_line(self, line: bytes) -> list[QMPEvent]:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge ints, deep nesting
            self._fail(f"qmp: not JSON: {line[:80]!r}")
        if not isinstance(msg, dict):
            self._fail(f"qmp: not an object: {line[:80]!r}")
        kind, event = self._classify(msg)
        nxt = _TRANSITIONS.get((self.state, kind))
        if nxt is None:
            self._fail(f"qmp: unexpected {kind.value} in state {self.state.value}")
        self.state = nxt
        if kind is _Kind.CAPS_ERROR:
            assert isinstance(event, ErrorReply)
            raise event.error
        if kind is _Kind.CAPS_RETURN:
            assert isinstance(event, Return)
            return [Ready(event.id)]
        if kind is _Kind.GREETING:
            assert isinstance(event, Greeting)
            self.greeting = event
        return [event]

    def _classify(self, msg: dict[str, Any]) -> tuple[_Kind, QMPEvent]:
        if "QMP" in msg:
            body = msg["QMP"]
            if not isinstance(body, dict):
                self._fail("qmp: malformed greeting")
            caps = body.get("capabilities", [])
            if not isinstance(caps, list):
                self._fail("qmp: malformed greeting")
            return _Kind.GREETING, Greeting(body.get("version", {}), tuple(str(c) for c in caps))
        if "event" in msg:
            ts = msg.get("timestamp")
            stamp = None
            if isinstance(ts, dict):
                try:
                    stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
                except (TypeError, ValueError, OverflowError):
                    self._fail("qmp: malformed event timestamp")
            data = msg.get("data", {})
            return _Kind.EVENT, Event(str(msg["event"]), data if isinstance(data, dict) else {},
                                      stamp)
        if "return" in msg or "error" in msg:
            raw_id = msg.get("id")
            cid = raw_id if isinstance(raw_id, str) else None
            if cid is not None and cid not in self._pending:
                self._fail(f"qmp: reply to unknown command id {raw_id!r}")
            if cid is None and "return" in msg:
                self._fail("qmp: return without id")
            command = self._pending.pop(cid) if cid is not None else None
            is_caps = cid is not None and cid == self._caps_id
            if "return" in msg:
                assert cid is not None and command is not None
                return (_Kind.CAPS_RETURN if is_caps else _Kind.RETURN,
                        Return(cid, command, msg["return"]))
            err = msg["error"]
            if not isinstance(err, dict):
                self._fail("qmp: malformed error")
            error = QMPError(str(err.get("class", "GenericError")), str(err.get("desc", "")),
                             command=command)
            if cid is None and self.state is State.NEGOTIATING:
                is_caps = True
            return _Kind.CAPS_ERROR if is_caps else _Kind.ERROR, ErrorReply(cid, command, error)
        self._fail(f"qmp: unknown message {sorted(msg)!r}")
