"""The admin protocol core, fed byte by byte."""

from __future__ import annotations

import json

import pytest

from gateway.admin.protocol import (
    MAX_DEPTH,
    MAX_LINE,
    NEED_DATA,
    BadRequest,
    ClientConnection,
    Closed,
    ConnectionFailed,
    ProtocolError,
    Request,
    Response,
    ServerConnection,
    State,
    parse_request,
)


def feed_bytewise(conn: ServerConnection | ClientConnection, data: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, (Request, BadRequest)):
                return events
    return events


def test_request_split_at_every_byte() -> None:
    wire = b'{"id": 7, "op": "volume-show", "args": {"name": "a"}}\n'
    server = ServerConnection()
    events = feed_bytewise(server, wire)
    assert events == [Request(7, "volume-show", {"name": "a"})]
    assert server.state is State.BUSY


def test_server_answers_then_takes_next_request() -> None:
    server = ServerConnection()
    server.receive_data(b'{"id":1,"op":"status"}\n{"id":"b","op":"volume-list","args":{}}\n')
    first = server.next_event()
    assert first == Request(1, "status", {})
    assert server.next_event() is NEED_DATA  # one at a time: answer first
    out = server.respond(1, {"protocol": 1})
    assert json.loads(out) == {"id": 1, "ok": True, "result": {"protocol": 1}}
    assert out.endswith(b"\n")
    assert server.next_event() == Request("b", "volume-list", {})
    err = server.respond_error("b", "not-found", "no volume named x")
    assert json.loads(err) == {"id": "b", "ok": False,
                               "error": {"code": "not-found", "message": "no volume named x"}}


@pytest.mark.parametrize(("line", "message"), [
    (b"not json", "request is not valid JSON"),
    (b"[1,2]", "request must be a JSON object"),
    (b'{"op":"status"}', "request needs an id (integer or string)"),
    (b'{"id":true,"op":"status"}', "request needs an id (integer or string)"),
    (b'{"id":1}', "request needs an op (string)"),
    (b'{"id":1,"op":"x","args":[]}', "args must be a JSON object"),
    (b"\xff\xfe", "request is not valid JSON"),
])
def test_bad_requests_are_answered_and_the_connection_survives(line: bytes, message: str) -> None:
    server = ServerConnection()
    server.receive_data(line + b"\n" + b'{"id":2,"op":"status"}\n')
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert event.message == message
    server.respond_error(event.id, "bad-request", event.message)
    assert server.next_event() == Request(2, "status", {})


def test_eof_and_overflow() -> None:
    server = ServerConnection()
    server.receive_data(b"")
    assert isinstance(server.next_event(), Closed)
    assert server.state is State.CLOSED

    server = ServerConnection()
    server.receive_data(b"x" * (MAX_LINE + 2))
    assert isinstance(server.next_event(), ConnectionFailed)
    assert server.state is State.ERROR
    assert isinstance(server.next_event(), ConnectionFailed)


def test_respond_without_request_is_a_local_bug() -> None:
    with pytest.raises(ProtocolError):
        ServerConnection().respond(1, None)
    client = ClientConnection()
    client.send("status")
    with pytest.raises(ProtocolError):
        client.send("status")


def test_client_round_trip_bytewise() -> None:
    client = ClientConnection()
    wire = client.send("volume-show", {"name": "a"})
    server = ServerConnection()
    request = feed_bytewise(server, wire)[0]
    assert isinstance(request, Request)
    reply = server.respond(request.id, {"name": "a"})
    events = feed_bytewise(client, reply)
    assert events == [Response(1, True, result={"name": "a"})]
    assert client.state is State.IDLE
    wire = client.send("volume-show", {"name": "b"})
    request = ServerConnection()
    request.receive_data(wire)
    ev = request.next_event()
    assert isinstance(ev, Request)
    client.receive_data(request.respond_error(ev.id, "not-found", "no volume named b"))
    assert client.next_event() == Response(2, False, code="not-found", message="no volume named b")


def test_client_rejects_unsolicited_or_garbled_responses() -> None:
    client = ClientConnection()
    client.receive_data(b'{"id":5,"ok":true,"result":1}\n')
    assert isinstance(client.next_event(), ConnectionFailed)
    client = ClientConnection()
    client.send("status")
    client.receive_data(b"garbage\n")
    assert isinstance(client.next_event(), ConnectionFailed)


def test_nesting_limit_is_exact_and_ignores_strings() -> None:
    def request(arrays: int) -> bytes:  # the request object and args are two levels
        return f'{{"id":1,"op":"x","args":{{"a":{"[" * arrays}{"]" * arrays}}}}}'.encode()

    assert isinstance(parse_request(request(MAX_DEPTH - 2)), Request)
    deep = request(MAX_DEPTH - 1)
    refused = parse_request(deep)
    assert refused == BadRequest(None, f"request nests deeper than {MAX_DEPTH} levels")
    quoted = f'{{"id":1,"op":"x","args":{{"s":"{"[" * 100}\\"{{"}}}}'.encode()
    assert parse_request(quoted) == Request(1, "x", {"s": "[" * 100 + '"{'})
