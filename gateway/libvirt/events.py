"""Domain lifecycle events from libvirt, delivered into trio.

libvirt's default event loop (virEventRegisterDefaultImpl) runs in one dedicated thread per
process; its callbacks only hand raw events to trio with TrioToken.run_sync_soon (never blocking
the loop). The trio side resolves the gateway attachment (volume, mode) -- from the live domain
when it can, else from a cache filled by the initial listing and by DEFINED/STARTED events,
because on STOPPED a domain may already be undefined -- and sends LifecycleEvent objects to a
memory channel. If libvirtd goes away the service reconnects with backoff.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import libvirt
import trio

from gateway.errors import GatewayError
from gateway.libvirt.connection import DEFAULT_URI, close_quietly, connect, libvirt_errors
from gateway.libvirt.domain import attachment_from_xml

EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from-snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from-snapshot", "wakeup"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from-snapshot"),
}


@dataclass(frozen=True)
class LifecycleEvent:
    name: str
    event: str  # "defined", "undefined", "started", "stopped", ...
    detail: str  # e.g. "booted", "destroyed", "shutdown", "failed"
    volume: str | None = None
    mode: str | None = None


def describe_event(event: int, detail: int) -> tuple[str, str]:
    ev = EVENTS.get(event, f"event-{event}")
    names = DETAILS.get(ev, ())
    return ev, names[detail] if 0 <= detail < len(names) else str(detail)


class _EventLoop:
    """The process's libvirt default event loop thread, shared and reference counted."""

    _lock = threading.Lock()
    _registered = False
    _users = 0
    _thread: threading.Thread | None = None
    _stop = False

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if not cls._registered:
                with libvirt_errors("registering the event loop"):
                    libvirt.virEventRegisterDefaultImpl()
                cls._registered = True
            cls._users += 1
            if cls._thread is None:
                cls._stop = False
                cls._thread = threading.Thread(target=cls._loop, name="libvirt-events",
                                               daemon=True)
                cls._thread.start()

    @classmethod
    def _loop(cls) -> None:
        while not cls._stop:
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError:
                pass

    @classmethod
    def release(cls) -> None:
        """Drop one user; the last one stops and joins the thread (blocking, brief)."""
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._thread is None:
                return
            thread, cls._thread = cls._thread, None
            cls._stop = True
            # virEventRunDefaultImpl blocks in poll(); a due timeout wakes it up.
            libvirt.virEventAddTimeout(0, _remove_timeout, None)
        thread.join()


def _remove_timeout(timer: int, _opaque: object) -> None:
    libvirt.virEventRemoveTimeout(timer)


class LifecycleEvents:
    """Service: `await nursery.start(events.run)`, then read `events.receive`.

    run() returns when cancelled and closes the send side; it raises BackendError if the first
    connection fails (later losses of libvirtd are retried with backoff)."""

    def __init__(self, uri: str = DEFAULT_URI, *, buffer: float = math.inf,
                 backoff_initial: float = 0.2, backoff_max: float = 5.0) -> None:
        self.uri = uri
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._send, self.receive = trio.open_memory_channel[LifecycleEvent](buffer)
        self._raw_send, self._raw_receive = trio.open_memory_channel[tuple[str, int, int]](
            math.inf)
        self.cache: dict[str, tuple[str, str]] = {}
        self.connected = trio.Event()
        self.reconnects = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(_EventLoop.acquire)
        try:
            async with self._send, trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver)
                first = True
                delay = self.backoff_initial
                while True:
                    lost = trio.Event()
                    try:
                        conn = await trio.to_thread.run_sync(self._connect, token, lost)
                    except GatewayError:
                        if first:
                            raise
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.backoff_max)
                        continue
                    delay = self.backoff_initial
                    self.connected.set()
                    if first:
                        first = False
                        task_status.started()
                    else:
                        self.reconnects += 1
                    try:
                        await lost.wait()
                    finally:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(self._disconnect, conn)
                    self.connected = trio.Event()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_EventLoop.release)

    def _connect(self, token: trio.lowlevel.TrioToken, lost: trio.Event) -> Any:
        conn = connect(self.uri)
        try:
            def on_close(_conn: Any, _reason: int, _opaque: object) -> None:
                _soon(token, lost.set)

            def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int,
                             _opaque: object) -> None:
                _soon(token, self._raw_send.send_nowait, (dom.name(), event, detail))

            with libvirt_errors(f"subscribing to events on {self.uri}"):
                conn.registerCloseCallback(on_close, None)
                conn.setKeepAlive(5, 3)
                callback_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
                for dom in conn.listAllDomains(0):
                    try:
                        found = attachment_from_xml(dom.XMLDesc(0))
                    except libvirt.libvirtError:
                        continue
                    if found is not None:
                        self.cache[dom.name()] = found
        except BaseException:
            close_quietly(conn)
            raise
        conn._gateway_callback_id = callback_id
        return conn

    @staticmethod
    def _disconnect(conn: Any) -> None:
        for undo in (lambda: conn.domainEventDeregisterAny(conn._gateway_callback_id),
                     conn.unregisterCloseCallback):
            try:
                undo()
            except libvirt.libvirtError:
                pass
        close_quietly(conn)

    def _lookup_attachment(self, name: str) -> tuple[str, str] | None:
        """Blocking: the attachment of a live domain, None if it is gone or not ours."""
        try:
            conn = connect(self.uri)
        except GatewayError:
            return None
        try:
            return attachment_from_xml(conn.lookupByName(name).XMLDesc(0))
        except libvirt.libvirtError:
            return None
        finally:
            close_quietly(conn)

    async def _deliver(self) -> None:
        async for name, event, detail in self._raw_receive:
            ev, det = describe_event(event, detail)
            if ev in ("defined", "started"):
                found = await trio.to_thread.run_sync(self._lookup_attachment, name)
                if found is not None:
                    self.cache[name] = found
            attachment = self.cache.get(name)
            if ev == "undefined":
                self.cache.pop(name, None)
            volume, mode = attachment if attachment is not None else (None, None)
            try:
                self._send.send_nowait(LifecycleEvent(name, ev, det, volume, mode))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # nobody reads (or too slowly): events are advisory


def _soon(token: trio.lowlevel.TrioToken, fn: Any, *args: Any) -> None:
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass
