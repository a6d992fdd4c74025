"""QMP over a Unix socket on trio: a thin adapter around the sans-I/O `QMPConnection`.

    async with QMPClient.connect(path) as qmp:
        await qmp.execute("query-block-exports")

One reader task feeds the core; commands run concurrently and are matched to replies by id.
Events go to every registered watcher (see `watch`) and to the optional `on_event` callback;
nothing else keeps them. The commands sent are kept in `sent`, the last SENT_LIMIT of them (for
tests and audits: a long-running daemon must not keep every command it ever sent).
OSError on the socket is mapped here, once, into BackendError; a misuse of the core
(LocalProtocolError) stays an InternalError, whichever side of the adapter meets it.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from gateway.errors import BackendError, InternalError
from gateway.nbd.qmp import (
    ErrorReply,
    Event,
    Greeting,
    QMPConnection,
    QMPError,
    Ready,
    Return,
)

Sent = collections.deque[tuple[str, dict[str, Any]]]
SENT_LIMIT = 256


def sent_log() -> Sent:
    """A bounded log of the commands sent: the newest SENT_LIMIT (command, arguments)."""
    return collections.deque(maxlen=SENT_LIMIT)


class _Reply:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class EventWatcher:
    """Collects events matching a predicate; register it BEFORE the command that causes them."""

    def __init__(self, predicate: Callable[[Event], bool]) -> None:
        self.predicate = predicate
        self.seen = trio.Event()
        self.event: Event | None = None

    async def wait(self) -> Event:
        await self.seen.wait()
        assert self.event is not None
        return self.event


class QMPClient:
    def __init__(self, stream: trio.SocketStream, *, sent: Sent | None = None,
                 on_event: Callable[[Event], None] | None = None, name: str = "qmp") -> None:
        self._stream = stream
        self._core = QMPConnection()
        self._replies: dict[str, _Reply] = {}
        self._send_lock = trio.Lock()
        self._watchers: list[EventWatcher] = []
        self._ready = trio.Event()
        self._greeting_seen = trio.Event()
        self._closed: BaseException | None = None
        self.closed = trio.Event()
        self.sent: Sent = sent if sent is not None else sent_log()
        self.on_event = on_event
        self.name = name
        self.greeting: Greeting | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str, *, sent: Sent | None = None,
                      on_event: Callable[[Event], None] | None = None,
                      name: str = "qmp", retry_for: float = 0.0) -> AsyncIterator[QMPClient]:
        """retry_for: keep retrying a refused/missing socket this long (a starting server)."""
        deadline = trio.current_time() + retry_for
        while True:
            try:
                stream = await trio.open_unix_socket(path)
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if trio.current_time() >= deadline:
                    raise BackendError(f"{name}: cannot connect to {path}: "
                                       f"{exc.strerror or exc}") from exc
                await trio.sleep(0.002)
            except OSError as exc:
                raise BackendError(f"{name}: cannot connect to {path}: "
                                   f"{exc.strerror or exc}") from exc
        async with stream, trio.open_nursery() as nursery:
            client = cls(stream, sent=sent, on_event=on_event, name=name)
            nursery.start_soon(client._reader)
            await client._negotiate()
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()

    # ---- public --------------------------------------------------------------------------------

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; returns its `return` value or raises QMPError / BackendError."""
        await self._ready.wait()
        return await self._execute(command, arguments)

    def watch(self, predicate: Callable[[Event], bool]) -> EventWatcher:
        w = EventWatcher(predicate)
        self._watchers.append(w)
        return w

    def unwatch(self, watcher: EventWatcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # ---- internals -----------------------------------------------------------------------------

    async def _negotiate(self) -> None:
        with trio.move_on_after(10):
            await self._greeting_seen.wait()
        if not self._greeting_seen.is_set():
            raise self._error("no greeting within 10s")
        if self._closed is not None:
            raise self._closed
        await self._execute("qmp_capabilities", None)
        self._ready.set()

    def _error(self, why: str) -> BackendError:
        return BackendError(f"{self.name}: {why}")

    async def _execute(self, command: str, arguments: Mapping[str, Any] | None) -> Any:
        if self._closed is not None:
            raise self._error(f"connection closed; cannot run {command}")
        cid, data = self._core.send_command(command, arguments)
        reply = _Reply()
        self._replies[cid] = reply
        self.sent.append((command, dict(arguments or {})))
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(data)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._error(f"send {command}: {exc}") from exc
            await reply.done.wait()
        finally:
            self._replies.pop(cid, None)
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def _reader(self) -> None:
        why: BaseException = self._error("connection closed by qemu")
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    why = self._error(f"connection lost: {exc}")
                    break
                if not data:
                    break
                self._core.receive_data(data)
                for ev in self._core.next_events():
                    self._dispatch(ev)
        except (QMPError, BackendError) as exc:  # protocol error or refused negotiation
            why = exc
        except InternalError as exc:  # a bug on this side: the waiting commands get it too
            why = exc
            raise
        finally:
            self._shutdown(why)

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, Greeting):
            self.greeting = ev
            self._greeting_seen.set()
        elif isinstance(ev, Ready):
            r = self._replies.get(ev.id)
            if r is not None:
                r.done.set()
        elif isinstance(ev, Return):
            r = self._replies.get(ev.id)
            if r is not None:
                r.value = ev.value
                r.done.set()
        elif isinstance(ev, ErrorReply):
            if ev.id is None:
                return  # a command QEMU could not parse at all; ours are always well-formed
            r = self._replies.get(ev.id)
            if r is not None:
                r.error = ev.error
                r.done.set()
        elif isinstance(ev, Event):
            for w in list(self._watchers):
                if not w.seen.is_set() and w.predicate(ev):
                    w.event = ev
                    w.seen.set()
            if self.on_event is not None:
                self.on_event(ev)

    def _shutdown(self, why: BaseException) -> None:
        self._closed = why
        for r in self._replies.values():
            if not r.done.is_set():
                r.error = why
                r.done.set()
        self._greeting_seen.set()
        self.closed.set()
