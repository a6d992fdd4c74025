"""An NBD client on trio, built on libnbd's asynchronous API.

    async with NBDClient.open(socket_path, "vol1") as c:
        data = await c.read_at(0, 4096)

or, for a client living as long as some owner's nursery:

    c = await NBDClient.connect(socket_path, "vol1", nursery=nursery)
    ...
    await c.aclose()

Design: one libnbd handle per connection and exactly ONE poller task per handle. The poller
asks libnbd which direction it wants (READ, WRITE or BOTH) and waits for that readiness on the
socket; for BOTH it races a readable and a writable wait so neither side can stall the other.
Submitters issue `aio_*` calls directly from the trio thread (they never block: the socket is
non-blocking and libnbd only queues/sends what fits) and then kick the poller if libnbd now wants
to write, because the poller may be parked in a readable-only wait. Completion callbacks only
store the errno and wake the waiting task; they never touch the handle.

Buffers: requests take plain buffer objects (a bytearray or a memoryview of one), never
`nbd.Buffer`. libnbd 1.14's binding takes a new reference to an nbd.Buffer's storage on every
aio_pread/aio_pwrite and never drops it, so each request leaked its whole buffer (100 requests of
1 MiB grew the process by 100 MiB); plain buffers are released on completion. Reads land directly
in the bytearray handed back to the caller, so nothing is copied on the way.

Each connection's socket sends with a large buffer (SEND_BUFFER), so a 1 MiB write leaves in one
go instead of waking the poller once per default-sized buffer.

Every libnbd error (nbd.Error) is mapped here, once, into BackendError with `.errno`. When the
server goes away (QSD restart) every in-flight and later call fails with BackendError;
`reconnect()` opens a fresh handle to the same export.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import nbd
import trio

from gateway.errors import BackendError, InvalidArgument

DEPTH = 64                     # requests in flight per connection
DEFAULT_MAX_REQUEST = 32 << 20  # NBD's customary maximum when the server says nothing
CHUNK = 2 << 20               # large writes are split into requests of this size
READ_CHUNK = 256 << 10        # large reads: in flight together, so QSD reads them in parallel
CONNECT_TIMEOUT = 10.0
SEND_BUFFER = 4 << 20          # SO_SNDBUF asked for (see _widen_send_buffer)


class NBDError(BackendError):
    """An NBD request or connection failed; `.errno` is the server's or libnbd's errno (or
    None)."""


def _map(exc: nbd.Error, what: str) -> NBDError:
    return NBDError(f"nbd: {what}: {exc.string}", errno=exc.errno)


def parse_uri(uri: str) -> tuple[str, str]:
    """nbd+unix:///NAME?socket=PATH -> (socket path, export name)."""
    u = urlparse(uri)
    if u.scheme != "nbd+unix":
        raise InvalidArgument(f"unsupported NBD URI {uri!r} (only nbd+unix)")
    sockets = parse_qs(u.query).get("socket")
    if not sockets:
        raise InvalidArgument(f"NBD URI {uri!r} has no socket")
    return sockets[0], unquote(u.path.lstrip("/"))


def _issue(method: str, count: int, offset: int, h: nbd.NBD, r: _Request) -> Any:
    return getattr(h, method)(count, offset, r.complete)


def _widen_send_buffer(fd: int) -> None:
    """Let a whole large write sit in the socket at once (the default send buffer, ~200 KiB,
    made a 1 MiB write wake the poller five times). The kernel caps it at net.core.wmem_max;
    failing to widen it only costs speed."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass
    finally:
        sock.detach()  # libnbd owns the fd


def _close_handle(h: nbd.NBD) -> None:
    """libnbd's Python binding closes a handle only in __del__; do it now, deterministically."""
    o = h.__dict__.pop("_o", None)
    if o is not None:
        nbd.libnbdmod.close(o)


class _Request:
    """One command in flight. Its task waits without checkpoints or events (the hot path of
    every block-view read) and cannot be cancelled: libnbd owns `buf` until completion."""

    __slots__ = ("_task", "buf", "errno", "finished")

    def __init__(self, buf: Any = None) -> None:
        self.finished = False
        self.errno = 0
        self.buf = buf  # kept alive until libnbd is done with it
        self._task: trio.lowlevel.Task | None = None

    def complete(self, err: Any) -> int:
        """libnbd's completion callback (runs inside aio_notify_* on the trio thread)."""
        self.finish(int(getattr(err, "value", 0) or 0))
        return 1  # retire the command

    def finish(self, code: int) -> None:
        if self.finished:
            return
        self.finished = True
        self.errno = code
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None

    async def wait(self) -> None:
        if self.finished:
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


class _Connection:
    """One libnbd handle plus its poller; dead for good once the socket fails."""

    def __init__(self, handle: nbd.NBD, label: str) -> None:
        self.h = handle
        self.label = label
        self.fd = -1
        self.inflight: set[_Request] = set()
        self.dead: NBDError | None = None
        self.ready = trio.Event()
        self.finished = trio.Event()
        self._kick_scope: trio.CancelScope | None = None
        self.scope = trio.CancelScope()

    def kick(self) -> None:
        """Wake the poller if it waits for readability only and libnbd now wants to write."""
        if self._kick_scope is not None and self.dead is None:
            try:
                want = self.h.aio_get_direction()
            except nbd.Error:
                want = nbd.AIO_DIRECTION_WRITE
            if want & nbd.AIO_DIRECTION_WRITE:
                self._kick_scope.cancel()

    def fail(self, why: NBDError) -> None:
        if self.dead is None:
            self.dead = why
        for r in list(self.inflight):
            r.finish(r.errno or errno_mod.ENOTCONN)
        self.inflight.clear()
        self.ready.set()

    async def poll(self) -> None:
        h = self.h
        try:
            with self.scope:
                while True:
                    if not self.ready.is_set() and h.aio_is_ready():
                        self.ready.set()
                    want = h.aio_get_direction()
                    if want == nbd.AIO_DIRECTION_READ:  # the steady state: awaiting replies
                        readable = False
                        with trio.CancelScope() as self._kick_scope:
                            await trio.lowlevel.wait_readable(self.fd)
                            readable = True
                        self._kick_scope = None
                        if readable:
                            h.aio_notify_read()
                    elif want == nbd.AIO_DIRECTION_BOTH:
                        await self._wait_both()
                    elif want & nbd.AIO_DIRECTION_WRITE:
                        await trio.lowlevel.wait_writable(self.fd)
                        h.aio_notify_write()
                    elif h.aio_is_dead() or h.aio_is_closed():
                        raise NBDError(f"nbd: {self.label}: connection lost",
                                       errno=errno_mod.ENOTCONN)
                    else:  # nothing to do on the socket (should not happen once connected)
                        with trio.CancelScope() as self._kick_scope:
                            await trio.sleep(0.05)
                        self._kick_scope = None
        except nbd.Error as exc:
            self.fail(_map(exc, self.label))
        except NBDError as exc:
            self.fail(exc)
        except (trio.ClosedResourceError, trio.BusyResourceError) as exc:
            # Not expected (aclose stops the poller before the fd closes), but a poller must
            # never take its owner's nursery down: the connection is dead, nothing more.
            self.fail(NBDError(f"nbd: {self.label}: poller lost its socket: {exc}",
                               errno=errno_mod.ENOTCONN))
        finally:
            self.fail(NBDError(f"nbd: {self.label}: connection closed", errno=errno_mod.ENOTCONN))
            self.finished.set()

    async def _wait_both(self) -> None:
        fired: list[int] = []
        async with trio.open_nursery() as nursery:
            async def wait(fn: Callable[[int], Any], which: int) -> None:
                await fn(self.fd)
                fired.append(which)
                nursery.cancel_scope.cancel()
            nursery.start_soon(wait, trio.lowlevel.wait_readable, nbd.AIO_DIRECTION_READ)
            nursery.start_soon(wait, trio.lowlevel.wait_writable, nbd.AIO_DIRECTION_WRITE)
        if nbd.AIO_DIRECTION_READ in fired:
            self.h.aio_notify_read()
        elif nbd.AIO_DIRECTION_WRITE in fired:
            self.h.aio_notify_write()

    async def aclose(self) -> None:
        """Stop the poller, then close the handle. In this order: once libnbd closes the socket
        its fd number may be reused at once (an admin connection, another export), and a
        poller still waiting on that number would watch, or be woken for, a stranger's socket."""
        self.scope.cancel()
        with trio.CancelScope(shield=True):
            await self.finished.wait()
        self.fd = -1
        self.fail(NBDError(f"nbd: {self.label}: client closed", errno=errno_mod.ESHUTDOWN))
        _close_handle(self.h)


class NBDClient:
    def __init__(self, socket_path: str, export_name: str, nursery: trio.Nursery) -> None:
        self.socket_path = socket_path
        self.export_name = export_name
        self._nursery = nursery
        self._conn: _Connection | None = None
        self._busy = 0  # requests in flight; at most DEPTH
        self._slot_free = trio.lowlevel.ParkingLot()
        self._closed = False
        self.size = 0
        self.read_only = True
        self.can_multi_conn = False
        self.can_flush = False
        self.can_trim = False
        self.can_zero = False
        self.max_request = DEFAULT_MAX_REQUEST
        self.min_request = 1

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, socket_or_uri: str, export_name: str | None = None
                   ) -> AsyncIterator[NBDClient]:
        # The pollers never raise, so an exception group here holds only the caller's (or
        # connect's) exception: unwrap it so callers catch NBDError as usual.
        try:
            async with trio.open_nursery() as nursery:
                client = await cls.connect(socket_or_uri, export_name, nursery=nursery)
                try:
                    yield client
                finally:
                    await client.aclose()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    @classmethod
    async def connect(cls, socket_or_uri: str, export_name: str | None = None, *,
                      nursery: trio.Nursery) -> NBDClient:
        if export_name is None:
            socket_path, export_name = parse_uri(socket_or_uri)
        else:
            socket_path = socket_or_uri
        client = cls(socket_path, export_name, nursery)
        await client.reconnect()
        return client

    @property
    def label(self) -> str:
        return f"{self.export_name}@{self.socket_path}"

    async def reconnect(self) -> None:
        """(Re)open the connection; in-flight requests on an old connection fail."""
        if self._closed:
            raise NBDError(f"nbd: {self.label}: client closed", errno=errno_mod.ESHUTDOWN)
        old, self._conn = self._conn, None
        if old is not None:
            await old.aclose()
        h = nbd.NBD()
        conn = _Connection(h, self.label)
        try:
            h.set_export_name(self.export_name)
            h.set_pread_initialize(False)  # read buffers are zeroed bytearrays already
            h.aio_connect_unix(self.socket_path)
            conn.fd = h.aio_get_fd()
            _widen_send_buffer(conn.fd)
        except nbd.Error as exc:
            _close_handle(h)
            raise _map(exc, f"{self.label}: connect") from None
        self._nursery.start_soon(conn.poll)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await conn.ready.wait()
        except trio.TooSlowError:
            await conn.aclose()
            raise NBDError(f"nbd: {self.label}: connect timed out",
                           errno=errno_mod.ETIMEDOUT) from None
        if conn.dead is not None:
            why = conn.dead
            await conn.aclose()
            raise NBDError(f"{why.message} (connect)", errno=why.errno)
        try:
            self.size = h.get_size()
            self.read_only = bool(h.is_read_only())
            self.can_multi_conn = bool(h.can_multi_conn())
            self.can_flush = bool(h.can_flush())
            self.can_trim = bool(h.can_trim())
            self.can_zero = bool(h.can_zero())
            self.max_request = min(h.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_REQUEST,
                                   DEFAULT_MAX_REQUEST)
            self.min_request = h.get_block_size(nbd.SIZE_MINIMUM) or 1
        except nbd.Error as exc:
            await conn.aclose()
            raise _map(exc, f"{self.label}: handshake") from None
        self._conn = conn

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    @property
    def connected(self) -> bool:
        # A request can meet a handle libnbd already declared dead before the poller notices.
        conn = self._conn
        return conn is not None and conn.dead is None and not conn.h.aio_is_dead()

    # ---- I/O -----------------------------------------------------------------------------------

    def _live(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise NBDError(f"nbd: {self.label}: not connected", errno=errno_mod.ENOTCONN)
        if conn.dead is not None:
            raise NBDError(conn.dead.message, errno=conn.dead.errno)
        return conn

    async def _submit(self, what: str, issue: Callable[[nbd.NBD, _Request], Any],
                      buf: Any = None) -> _Request:
        while self._busy >= DEPTH:
            await self._slot_free.park()
        self._busy += 1
        try:
            conn = self._live()
            req = _Request(buf)
            try:
                issue(conn.h, req)
            except nbd.Error as exc:
                raise _map(exc, f"{self.label}: {what}") from None
            conn.inflight.add(req)
            conn.kick()
            await req.wait()
            conn.inflight.discard(req)
        finally:
            self._busy -= 1
            self._slot_free.unpark()
        if req.errno:
            name = errno_mod.errorcode.get(req.errno, "error")
            raise NBDError(f"nbd: {self.label}: {what}: {name} ({req.errno})", errno=req.errno)
        return req

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"nbd: {self.label}: range {offset}+{length} outside "
                                  f"0..{self.size}")

    async def _read_into(self, offset: int, view: memoryview) -> None:
        # libnbd writes straight into the caller's memory: no copy on the way back.
        await self._submit(f"read {offset}+{len(view)}",
                           lambda h, r: h.aio_pread(view, offset, r.complete), view)

    async def read_at(self, offset: int, length: int) -> bytearray:
        """Bytes [offset, offset+length) in one buffer the caller owns (large reads are split
        into READ_CHUNK-sized requests in flight together)."""
        self._check_range(offset, length)
        data = bytearray(length)
        if length == 0:
            return data
        step = min(READ_CHUNK, self.max_request)
        if length <= step:  # the common case (every 4 KiB read of a container): no view needed
            await self._submit(f"read {offset}+{length}",
                               lambda h, r: h.aio_pread(data, offset, r.complete), data)
            return data
        view = memoryview(data)
        async with trio.open_nursery() as nursery:
            for i in range(0, length, step):
                nursery.start_soon(self._read_into, offset + i, view[i:i + step])
        return data

    async def _write_chunk(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        # The caller's buffer is shared, not copied: write_at holds it until completion.
        await self._submit(f"write {offset}+{len(data)}",
                           lambda h, r: h.aio_pwrite(data, offset, r.complete), data)

    async def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        if self.read_only:
            raise NBDError(f"nbd: {self.label}: export is read-only", errno=errno_mod.EROFS)
        view = memoryview(data)
        step = min(CHUNK, self.max_request)
        if len(view) <= step:
            await self._write_chunk(offset, view)
            return
        async with trio.open_nursery() as nursery:
            for i in range(0, len(view), step):
                nursery.start_soon(self._write_chunk, offset + i, view[i:i + step])

    async def flush(self) -> None:
        if not self.can_flush:
            return
        await self._submit("flush", lambda h, r: h.aio_flush(r.complete))

    async def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self.read_only:
            raise NBDError(f"nbd: {self.label}: export is read-only", errno=errno_mod.EROFS)
        if not self.can_trim or length == 0:
            return
        for off in range(offset, offset + length, self.max_request):
            n = min(self.max_request, offset + length - off)
            await self._submit(f"trim {off}+{n}", functools.partial(_issue, "aio_trim", n, off))

    async def zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self.read_only:
            raise NBDError(f"nbd: {self.label}: export is read-only", errno=errno_mod.EROFS)
        if length == 0:
            return
        if not self.can_zero:
            await self.write_at(offset, bytes(length))
            return
        for off in range(offset, offset + length, self.max_request):
            n = min(self.max_request, offset + length - off)
            await self._submit(f"zero {off}+{n}", functools.partial(_issue, "aio_zero", n, off))


__all__ = ["NBDClient", "NBDError", "parse_uri"]
