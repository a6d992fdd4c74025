"""Property fuzzing of the two sans-I/O cores: the admin protocol and QMP.

Random and mutated byte streams, split at random points, go into gateway.admin.protocol's
connections and gateway.nbd.qmp.QMPConnection. Checked: only the documented exceptions escape, the
result does not depend on how the stream was split, and the state machines keep their invariants.

Bounded for `make test` (FUZZ_CORES_EXAMPLES, default 250 each); `make fuzz-cores` runs many more.

Bugs these found, fixed, with regression tests at the bottom:
  BUG-1 a request line of deeply nested JSON ("[[[[...") makes json.loads raise RecursionError in
        parse_request; the admin server does not catch it and the whole gatewayd exits.
  BUG-2 an integer longer than 4300 digits makes json.loads raise ValueError (not
        JSONDecodeError): same crash.
  BUG-3 QMP: a greeting whose "capabilities" is not a list (TypeError), an event timestamp that is
        not a number (ValueError/TypeError/OverflowError), and BUG-1/2 in QMP lines escape as
        undocumented exceptions instead of QMPProtocolError.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admin import protocol
from gateway.admin.protocol import (
    NEED_DATA,
    BadRequest,
    ClientConnection,
    Closed,
    ConnectionFailed,
    Request,
    Response,
    ServerConnection,
    State,
    parse_request,
)
from gateway.nbd import qmp

pytestmark = pytest.mark.timeout(240)
EXAMPLES = int(os.environ.get("FUZZ_CORES_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies --------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ids = st.integers(-2**63, 2**63) | st.text(max_size=10) | json_values


@st.composite
def request_objects(draw: st.DrawFn) -> Any:
    obj: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        obj["id"] = draw(ids)
    if draw(st.integers(0, 4)):
        obj["op"] = draw(st.sampled_from(["status", "volume-add", "mount", ""]) | json_values)
    if draw(st.booleans()):
        obj["args"] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4)
                           | json_values)
    extra = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2))
    return {**extra, **obj} if draw(st.booleans()) else draw(json_values)


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Byte-level mutations: flip, insert, delete at positions (no newlines introduced)."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        at = pos % len(buf)
        byte = value if value != 0x0A else 0x0B
        if kind == 0:
            buf[at] = byte
        elif kind == 1:
            buf.insert(at, byte)
        elif buf[at] != 0x0A:
            del buf[at]
    return bytes(buf)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """One line (without its newline): a request, a mutated request, or raw garbage."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if choice == 4:  # hostile nesting depth
        depth = draw(st.integers(1, 3000))
        return b'{"id":1,"op":"x","args":{"a":' + b"[" * depth + b"]" * depth + b"}}"
    if choice == 5:  # hostile number length
        return b'{"id":' + b"7" * draw(st.integers(1, 6000)) + b',"op":"status"}'
    text = json.dumps(draw(request_objects())).encode()
    if choice == 1:
        mutations = st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255))
        text = mutate(text, draw(st.lists(mutations, max_size=4)))
    return text


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[last:p])
        last = p
    return [c for c in chunks if c]


# ---- admin protocol, server side ----------------------------------------------------------------

def drain_server(conn: ServerConnection, out: list[Any], respond_ok: bool) -> None:
    while True:
        before = conn.state
        event = conn.next_event()
        if event is NEED_DATA:
            return
        out.append(event)
        if isinstance(event, Request):
            assert before is State.IDLE and conn.state is State.BUSY
            assert isinstance(event.op, str) and event.op
            assert isinstance(event.id, (int, str)) and not isinstance(event.id, bool)
            assert isinstance(event.args, dict)
            reply = (conn.respond(event.id, {"echo": event.op}) if respond_ok
                     else conn.respond_error(event.id, "bad", "no"))
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1
            assert json.loads(reply)["id"] == event.id
            # mypy keeps the narrowing of conn.state across the reply that changes it
            assert conn.state is State.IDLE  # type: ignore[comparison-overlap]
        elif isinstance(event, BadRequest):
            assert conn.state is State.BUSY
            conn.respond_error(event.id, "bad-request", event.message)
            assert conn.state is State.IDLE  # type: ignore[comparison-overlap]  # as above
        elif isinstance(event, Closed):
            assert conn.state is State.CLOSED
            return
        else:
            assert isinstance(event, ConnectionFailed)
            assert conn.state is State.ERROR
            assert isinstance(conn.next_event(), ConnectionFailed)  # sticky
            return


def run_server(chunks: list[bytes], eof: bool, respond_ok: bool) -> list[Any] | str:
    conn = ServerConnection()
    out: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        drain_server(conn, out, respond_ok)
        if out and isinstance(out[-1], (Closed, ConnectionFailed)):
            return out
    if eof:
        conn.receive_data(b"")
        drain_server(conn, out, respond_ok)
    return out


@FUZZ
@given(st.lists(lines(), max_size=12), st.lists(st.integers(0, 2**16), max_size=12),
       st.booleans(), st.booleans(), st.binary(max_size=20))
def test_server_core_handles_any_byte_stream(body: list[bytes], cuts: list[int], eof: bool,
                                             respond_ok: bool, tail: bytes) -> None:
    data = b"".join(line + b"\n" for line in body) + tail.replace(b"\n", b"")
    whole = run_server([data] if data else [], eof, respond_ok)
    pieces = run_server(split(data, cuts), eof, respond_ok)
    assert pieces == whole  # the split points never matter
    if isinstance(whole, str):
        return  # a known bug (BUG-1/2) hit; its regression test is below
    expected = [parse_request(line) for line in body]
    got = [e for e in whole if isinstance(e, (Request, BadRequest))]
    assert got == expected
    if eof:
        assert isinstance(whole[-1], Closed)


@settings(max_examples=max(10, EXAMPLES // 20), deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(0, protocol.MAX_LINE * 2), max_size=6),
       st.booleans())
def test_server_core_overflow_is_sticky(extra: int, cuts: list[int], newline: bool) -> None:
    line = b"x" * (protocol.MAX_LINE + extra) + (b"\n" if newline else b"")
    conn = ServerConnection()
    events = []
    for chunk in split(line, cuts):
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionFailed):
                break
        if events:
            break
    assert events and isinstance(events[0], ConnectionFailed)
    assert conn.state is State.ERROR
    conn.receive_data(b'{"id":1,"op":"status"}\n')
    assert isinstance(conn.next_event(), ConnectionFailed)


def test_request_at_exactly_max_line_is_accepted() -> None:
    pad = protocol.MAX_LINE - len(b'{"id":1,"op":"status","args":{"p":""}}')
    line = b'{"id":1,"op":"status","args":{"p":"' + b"a" * pad + b'"}}'
    assert len(line) == protocol.MAX_LINE
    conn = ServerConnection()
    conn.receive_data(line[:1000])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(line[1000:] + b"\n")
    event = conn.next_event()
    assert isinstance(event, Request) and len(event.args["p"]) == pad


# ---- admin protocol, client side ----------------------------------------------------------------

@FUZZ
@given(st.lists(json_values | st.binary(max_size=30), max_size=6),
       st.lists(st.integers(0, 4096), max_size=8))
def test_client_core_handles_any_response_stream(items: list[Any], cuts: list[int]) -> None:
    client = ClientConnection()
    client.send("status")
    data = b"".join((x.replace(b"\n", b"") if isinstance(x, bytes)
                     else json.dumps(x).encode()) + b"\n" for x in items)
    for chunk in [*split(data, cuts), b""]:
        client.receive_data(chunk)
        while (event := client.next_event()) is not NEED_DATA:
            if isinstance(event, Response):
                assert client.state is State.IDLE
                assert isinstance(event.code, str) and isinstance(event.message, str)
                client.send("status")
                continue
            assert isinstance(event, (Closed, ConnectionFailed))
            assert client.state in (State.CLOSED, State.ERROR)
            return


def test_client_and_server_round_trip() -> None:
    server, client = ServerConnection(), ClientConnection()
    for op in ("status", "volume-list", "metrics"):
        server.receive_data(client.send(op, {"n": 1}))
        request = server.next_event()
        assert isinstance(request, Request) and request.op == op
        client.receive_data(server.respond(request.id, {"op": op}))
        response = client.next_event()
        assert isinstance(response, Response) and response.result == {"op": op}
    with pytest.raises(protocol.ProtocolError):
        server.respond(1, None)  # nothing pending: a local bug, the documented exception


# ---- QMP ----------------------------------------------------------------------------------------

GREETING = {"QMP": {"version": {"qemu": {"major": 8}}, "capabilities": ["oob"]}}


@st.composite
def qmp_messages(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return GREETING
    if kind == 1:
        return {"return": draw(json_values), "id": draw(st.sampled_from(
            ["gw-1", "gw-2", "gw-3", "gw-9"]) | ids)}
    if kind == 2:
        return {"error": draw(st.fixed_dictionaries(
            {"class": st.text(max_size=10), "desc": st.text(max_size=20)}) | json_values),
            **({"id": draw(st.sampled_from(["gw-1", "gw-2"]) | ids)} if draw(st.booleans())
               else {})}
    if kind == 3:
        numbers = st.integers(0, 2**40) | json_values
        stamp = draw(st.fixed_dictionaries({"seconds": numbers, "microseconds": numbers})
                     | json_values)
        return {"event": draw(st.text(max_size=10)), "data": draw(json_values),
                "timestamp": stamp}
    if kind == 4:
        return {"QMP": draw(st.fixed_dictionaries({"version": json_values,
                                                   "capabilities": json_values}) | json_values)}
    return draw(json_values)


def qmp_feed(chunks: list[bytes], commands: int) -> tuple[list[str], str]:
    """Drive a QMPConnection like the trio adapter does; returns (event reprs, outcome)."""
    conn = qmp.QMPConnection()
    seen: list[str] = []
    ready = 0
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except qmp.LocalProtocolError:
            assert conn.state is qmp.State.FAILED
            return seen, "failed"
        pending_before = conn.pending
        try:
            events = conn.next_events()
        except (qmp.QMPProtocolError, qmp.QMPError) as exc:
            assert conn.state is qmp.State.FAILED
            with pytest.raises(qmp.LocalProtocolError):
                conn.receive_data(b"{}\n")
            with pytest.raises(qmp.LocalProtocolError):
                conn.send_command("query-version")
            return seen, type(exc).__name__
        for event in events:
            if isinstance(event, (qmp.Return, qmp.ErrorReply)) and event.id is not None:
                assert event.id in pending_before and event.id not in conn.pending
            if isinstance(event, qmp.Ready):
                ready += 1
                assert conn.state is qmp.State.READY
            if isinstance(event, qmp.ErrorReply):
                seen.append(f"error {event.id} {event.command} {event.error.message}")
            else:
                seen.append(repr(event))
        assert ready <= 1
        if conn.state is qmp.State.NEGOTIATING and not conn.pending and ready == 0:
            conn.negotiate()
        while conn.state is qmp.State.READY and len(conn.pending) < commands:
            conn.send_command("query-block-exports", {"n": len(conn.pending)})
    return seen, conn.state.value


@FUZZ
@given(st.lists(qmp_messages(), max_size=10), st.lists(st.integers(0, 8192), max_size=10),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)),
                max_size=3),
       st.integers(0, 3), st.booleans(), st.sampled_from([b"\n", b"\r\n"]))
def test_qmp_core_handles_any_byte_stream(messages: list[Any], cuts: list[int],
                                          mutations: list[tuple[int, int, int]], commands: int,
                                          greet: bool, eol: bytes) -> None:
    body = [GREETING, {"return": {}, "id": "gw-1"}, *messages] if greet else messages
    data = b"".join(json.dumps(m).encode() + eol for m in body)
    data = mutate(data, mutations)
    # Split-invariance: commands are only sent between chunks, so compare against a feed that
    # splits at every line end (the finest point where the driver acts) instead of one chunk.
    per_line = [p + b"\n" for p in data.split(b"\n")[:-1]] + (
        [data.rsplit(b"\n", 1)[-1]] if not data.endswith(b"\n") else [])
    finest = [c for c in per_line if c]
    reference = qmp_feed(finest, commands)
    pieces: list[bytes] = []
    for piece in finest:
        pieces += split(piece, [c for c in cuts if c < len(piece)]) or [piece]
    assert qmp_feed(pieces, commands) == reference


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 256), max_size=8))
def test_qmp_core_survives_raw_garbage(data: bytes, cuts: list[int]) -> None:
    qmp_feed(split(data, cuts), 2)


def test_qmp_overlong_line_fails_cleanly() -> None:
    conn = qmp.QMPConnection()
    conn.receive_data(b"{" + b" " * (qmp.MAX_LINE + 1))
    with pytest.raises(qmp.QMPProtocolError, match="too long"):
        conn.next_events()
    assert conn.state is qmp.State.FAILED


# ---- regression tests for what the fuzzing found ----------------------------------------------

HOSTILE_JSON_LINES = [
    pytest.param(b"[" * 100_000, id="BUG-1-deep-nesting"),
    pytest.param(b'{"id":1,"op":"status","args":{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
                 id="BUG-1-deep-nesting-in-args"),
    pytest.param(b'{"id":' + b"1" * 5000 + b',"op":"status"}', id="BUG-2-huge-int"),
]
@pytest.mark.parametrize("line", HOSTILE_JSON_LINES)
def test_server_core_answers_hostile_json_with_bad_request(line: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(line + b"\n")
    assert isinstance(conn.next_event(), BadRequest)


@pytest.mark.parametrize("line", HOSTILE_JSON_LINES)
def test_client_core_fails_cleanly_on_hostile_json(line: bytes) -> None:
    client = ClientConnection()
    client.send("status")
    client.receive_data(line + b"\n")
    assert isinstance(client.next_event(), ConnectionFailed)


@pytest.mark.parametrize("lines_", [
    pytest.param([b'{"QMP": {"capabilities": 5}}'], id="caps-not-a-list"),
    pytest.param([b'{"QMP": {"capabilities": []}}',
                  b'{"event": "X", "timestamp": {"seconds": "soon"}}'], id="timestamp-text"),
    pytest.param([b'{"QMP": {"capabilities": []}}',
                  b'{"event": "X", "timestamp": {"seconds": [1]}}'], id="timestamp-list"),
    pytest.param([b'{"QMP": {"capabilities": []}}',
                  b'{"event": "X", "timestamp": {"seconds": 1' + b"0" * 400 + b"}}"],
                 id="timestamp-overflow"),
    pytest.param([b"[" * 100_000], id="deep-nesting"),
])
def test_qmp_core_rejects_malformed_messages_as_protocol_errors(lines_: list[bytes]) -> None:
    conn = qmp.QMPConnection()
    conn.receive_data(b"\r\n".join(lines_) + b"\r\n")
    with pytest.raises(qmp.QMPProtocolError):
        conn.next_events()
    assert conn.state is qmp.State.FAILED
