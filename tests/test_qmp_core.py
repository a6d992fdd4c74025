"""The sans-I/O QMP core, fed byte by byte."""

from __future__ import annotations

import json

import pytest

from gateway.errors import BackendError
from gateway.nbd.qmp import (
    ErrorReply,
    Event,
    Greeting,
    LocalProtocolError,
    QMPConnection,
    QMPError,
    QMPProtocolError,
    Ready,
    Return,
    State,
)

pytestmark = pytest.mark.timeout(10)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
            b'"package": ""}, "capabilities": ["oob"]}}\r\n')


def feed_bytewise(conn: QMPConnection, data: bytes) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        out.extend(conn.next_events())
    return out


def ready_conn() -> QMPConnection:
    conn = QMPConnection()
    assert feed_bytewise(conn, GREETING)[0] == Greeting(
        {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, ("oob",))
    raw = conn.negotiate()
    cid = json.loads(raw)["id"]
    assert json.loads(raw) == {"execute": "qmp_capabilities", "id": cid}
    assert feed_bytewise(conn, b'{"return": {}, "id": "%s"}\r\n' % cid.encode()) == [Ready(cid)]
    assert conn.state is State.READY
    return conn


def test_greeting_split_across_feeds_then_negotiation() -> None:
    conn = QMPConnection()
    assert conn.state is State.GREETING
    conn.receive_data(GREETING[:10])
    assert conn.next_events() == []
    conn.receive_data(GREETING[10:-1])
    assert conn.next_events() == []
    conn.receive_data(GREETING[-1:])
    [greeting] = conn.next_events()
    assert isinstance(greeting, Greeting) and greeting.capabilities == ("oob",)
    # mypy keeps the narrowing of conn.state across the calls that change it
    assert conn.state is State.NEGOTIATING  # type: ignore[comparison-overlap]


def test_no_command_before_greeting_or_negotiation() -> None:
    conn = QMPConnection()
    with pytest.raises(LocalProtocolError):
        conn.send_command("query-version")
    feed_bytewise(conn, GREETING)
    with pytest.raises(LocalProtocolError):
        conn.send_command("query-version")
    conn.negotiate()
    with pytest.raises(LocalProtocolError):
        conn.negotiate()


def test_commands_have_ids_and_arguments() -> None:
    conn = ready_conn()
    id1, raw1 = conn.send_command("blockdev-del", {"node-name": "n1"})
    id2, raw2 = conn.send_command("query-block-exports")
    assert id1 != id2
    assert raw1.endswith(b"\n") and b"\n" not in raw1[:-1]
    assert json.loads(raw1) == {"execute": "blockdev-del", "id": id1,
                                "arguments": {"node-name": "n1"}}
    assert "arguments" not in json.loads(raw2)
    assert conn.pending == {id1, id2}


def test_interleaved_events_and_out_of_order_returns() -> None:
    conn = ready_conn()
    id1, _ = conn.send_command("a")
    id2, _ = conn.send_command("b")
    stream = (
        b'{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "x"}, '
        b'"timestamp": {"seconds": 10, "microseconds": 500000}}\r\n'
        + b'{"return": [1, 2], "id": "%s"}\r\n' % id2.encode()
        + b'{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j"}}\r\n'
        + b'{"id": "%s", "error": {"class": "GenericError", "desc": "Node not found"}}\r\n'
        % id1.encode()
    )
    events = feed_bytewise(conn, stream)
    assert events == [
        Event("BLOCK_EXPORT_DELETED", {"id": "x"}, 10.5),
        Return(id2, "b", [1, 2]),
        Event("JOB_STATUS_CHANGE", {"status": "running", "id": "j"}, None),
        ErrorReply(id1, "a", events[3].error),  # type: ignore[attr-defined]
    ]
    err = events[3].error  # type: ignore[attr-defined]
    assert isinstance(err, QMPError) and isinstance(err, BackendError)
    assert (err.error_class, err.desc, err.command) == ("GenericError", "Node not found", "a")
    assert conn.pending == frozenset()


def test_several_messages_in_one_feed_and_blank_lines() -> None:
    conn = ready_conn()
    cid, _ = conn.send_command("x")
    conn.receive_data(b'\r\n{"event": "E"}\n{"return": {}, "id": "%s"}\n\n' % cid.encode())
    assert conn.next_events() == [Event("E", {}, None), Return(cid, "x", {})]


def test_event_during_negotiation() -> None:
    conn = QMPConnection()
    feed_bytewise(conn, GREETING)
    cid = json.loads(conn.negotiate())["id"]
    events = feed_bytewise(conn, b'{"event": "E"}\n{"return": {}, "id": "%s"}\n' % cid.encode())
    assert events == [Event("E", {}, None), Ready(cid)]


def test_refused_negotiation_fails_connection() -> None:
    conn = QMPConnection()
    feed_bytewise(conn, GREETING)
    cid = json.loads(conn.negotiate())["id"]
    with pytest.raises(QMPError, match="CommandNotFound"):
        feed_bytewise(conn, b'{"error": {"class": "CommandNotFound", "desc": "no"}, '
                            b'"id": "%s"}\n' % cid.encode())
    assert conn.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"{}")


@pytest.mark.parametrize("garbage", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"hello": 1}\n',
    b'{"return": {}, "id": "nobody"}\n',
    b'{"return": {}}\n',
    b'\xff\xfe\n',
])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    conn = ready_conn()
    with pytest.raises(QMPProtocolError):
        feed_bytewise(conn, garbage)
    assert conn.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        conn.send_command("x")


def test_unexpected_message_for_state() -> None:
    conn = QMPConnection()
    with pytest.raises(QMPProtocolError):
        feed_bytewise(conn, b'{"event": "E"}\n')  # an event before the greeting
    conn = ready_conn()
    with pytest.raises(QMPProtocolError):
        feed_bytewise(conn, GREETING)  # a second greeting


def test_error_without_id_after_negotiation() -> None:
    conn = ready_conn()
    [ev] = feed_bytewise(conn, b'{"error": {"class": "GenericError", "desc": "JSON parse"}}\n')
    assert isinstance(ev, ErrorReply) and ev.id is None and ev.error.desc == "JSON parse"
