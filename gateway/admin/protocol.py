"""The admin protocol, sans I/O: JSON lines, one request and one response each.

A request is `{"id": ID, "op": NAME, "args": {...}}`; a response is `{"id": ID, "ok": true,
"result": ...}` or `{"id": ID, "ok": false, "error": {"code": CODE, "message": TEXT}}`.

Both ends are state machines fed with bytes. `ServerConnection.next_event()` yields Request,
BadRequest (a line that is not a valid request: answer it and carry on), NEED_DATA or Closed; once
a line exceeds MAX_LINE the connection is in ERROR and yields only ConnectionFailed. The client end
mirrors it with Response events.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE = 1024 * 1024
MAX_DEPTH = 32  # JSON nesting allowed in a request; deeper is refused before parsing


class State(enum.Enum):
    IDLE = "idle"  # waiting for a request (server) or free to send one (client)
    BUSY = "busy"  # a request is being answered
    CLOSED = "closed"  # the peer closed its side
    ERROR = "error"  # the byte stream cannot be trusted any more


class Sentinel(enum.Enum):
    NEED_DATA = "need-data"


NEED_DATA = Sentinel.NEED_DATA


@dataclass(frozen=True)
class Request:
    id: Any
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class BadRequest:
    id: Any
    message: str


@dataclass(frozen=True)
class Response:
    id: Any
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class Closed:
    pass


@dataclass(frozen=True)
class ConnectionFailed:
    message: str


ServerEvent = Request | BadRequest | Closed | ConnectionFailed | Sentinel
ClientEvent = Response | Closed | ConnectionFailed | Sentinel

# (state, what happened) -> next state. What is not in a table is a protocol violation.
SERVER_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "request"): State.BUSY,
    (State.IDLE, "bad-request"): State.BUSY,
    (State.BUSY, "respond"): State.IDLE,
    (State.IDLE, "eof"): State.CLOSED,
    (State.BUSY, "eof"): State.CLOSED,
    (State.IDLE, "overflow"): State.ERROR,
    (State.BUSY, "overflow"): State.ERROR,
}
CLIENT_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "send"): State.BUSY,
    (State.BUSY, "response"): State.IDLE,
    (State.IDLE, "eof"): State.CLOSED,
    (State.BUSY, "eof"): State.CLOSED,
    (State.IDLE, "overflow"): State.ERROR,
    (State.BUSY, "overflow"): State.ERROR,
}


class ProtocolError(Exception):
    """The local side broke the protocol (a bug in the caller, not bad peer input)."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


class _LineBuffer:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
        self._buf += data

    def line(self) -> bytes | None:
        end = self._buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return line

    @property
    def overflow(self) -> bool:
        return len(self._buf) > MAX_LINE and self._buf.find(b"\n", 0, MAX_LINE + 1) < 0


class _Machine:
    transitions: dict[tuple[State, str], State]

    def __init__(self) -> None:
        self.state = State.IDLE
        self._lines = _LineBuffer()

    def _move(self, what: str) -> None:
        key = (self.state, what)
        if key not in self.transitions:
            raise ProtocolError(f"{what} is not allowed in state {self.state.value}")
        self.state = self.transitions[key]

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        self._lines.feed(data)

    def _next_line(self) -> bytes | ConnectionFailed | Closed | Sentinel:
        if self.state is State.ERROR:
            return ConnectionFailed("connection already failed")
        line = self._lines.line()
        if line is not None:
            if len(line) > MAX_LINE:
                self._move("overflow")
                return ConnectionFailed(f"line longer than {MAX_LINE} bytes")
            return line
        if self._lines.overflow:
            self._move("overflow")
            return ConnectionFailed(f"line longer than {MAX_LINE} bytes")
        if self._lines.eof:
            if self.state is not State.CLOSED:
                self._move("eof")
            return Closed()
        return NEED_DATA


class ServerConnection(_Machine):
    transitions = SERVER_TRANSITIONS

    def next_event(self) -> ServerEvent:
        if self.state is State.BUSY:
            return NEED_DATA  # answer the current request first
        line = self._next_line()
        if not isinstance(line, bytes):
            return line
        event = parse_request(line)
        self._move("request" if isinstance(event, Request) else "bad-request")
        return event

    def respond(self, request_id: Any, result: Any) -> bytes:
        self._move("respond")
        return encode({"id": request_id, "ok": True, "result": result})

    def respond_error(self, request_id: Any, code: str, message: str) -> bytes:
        self._move("respond")
        return encode({"id": request_id, "ok": False,
                       "error": {"code": code, "message": message}})


def nesting_depth_exceeds(line: bytes, limit: int) -> bool:
    """True if arrays/objects nest deeper than `limit` (brackets inside strings do not count).

    Decided before json.loads, whose own limit depends on how deep the caller's stack is."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_request(line: bytes) -> Request | BadRequest:
    if nesting_depth_exceeds(line, MAX_DEPTH):
        return BadRequest(None, f"request nests deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge ints, deep nesting
        return BadRequest(None, "request is not valid JSON")
    if not isinstance(obj, dict):
        return BadRequest(None, "request must be a JSON object")
    request_id = obj.get("id")
    if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
        return BadRequest(None, "request needs an id (integer or string)")
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        return BadRequest(request_id, "request needs an op (string)")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        return BadRequest(request_id, "args must be a JSON object")
    return Request(request_id, op, args)


class ClientConnection(_Machine):
    transitions = CLIENT_TRANSITIONS

    def __init__(self) -> None:
        super().__init__()
        self._next_id = 1
        self._pending: Any = None

    def send(self, op: str, args: dict[str, Any] | None = None) -> bytes:
        self._move("send")
        self._pending = self._next_id
        self._next_id += 1
        return encode({"id": self._pending, "op": op, "args": args or {}})

    def next_event(self) -> ClientEvent:
        line = self._next_line()
        if not isinstance(line, bytes):
            return line
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            self.state = State.ERROR
            return ConnectionFailed("response is not valid JSON")
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            self.state = State.ERROR
            return ConnectionFailed("response is not a protocol object")
        if self.state is not State.BUSY or obj.get("id") not in (self._pending, None):
            self.state = State.ERROR
            return ConnectionFailed("response does not answer the pending request")
        self._move("response")
        if obj["ok"]:
            return Response(obj.get("id"), True, result=obj.get("result"))
        raw_error = obj.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        return Response(obj.get("id"), False, code=str(error.get("code", "internal")),
                        message=str(error.get("message", "unknown error")))
