"""The gateway's reconnecting connection to one export: what the block view and the probe read
through.

When QSD restarts, its connection drops; the next request waits for QSD to be ready again,
reconnects once and retries, so a loop device over the block view sees a short stall instead of
an I/O error. `Ready` is whatever says when QSD serves again: the supervisor in gatewayd, or (in
the data plane) the NBD socket accepting connections.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from gateway.errors import BackendError
from gateway.log import fields
from gateway.nbd.client import NBDClient, NBDError

log = logging.getLogger("gateway.export.backend")
T = TypeVar("T")
RECONNECT_TIMEOUT = 15.0
DEATH_NOTICE = 0.25  # seconds a failed request waits to see whether its connection died
CONNECTION_ERRNOS = frozenset({errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN})


class Ready(Protocol):
    async def wait_ready(self, timeout: float = ...) -> Any: ...


class VolumeBackend:
    """The gateway's connection to one export, reconnecting across QSD restarts."""

    def __init__(self, client: NBDClient, qsd: Ready) -> None:
        self.client = client
        self.qsd = qsd
        self._reconnecting = trio.Lock()
        self.reconnects = 0
        self.writes = 0  # requests that may have changed the disk (standby caches check it)

    @property
    def size(self) -> int:
        return self.client.size

    @property
    def read_only(self) -> bool:
        return self.client.read_only

    async def _connection_lost(self, failed: NBDError) -> bool:
        """Whether `failed` came from a lost connection rather than from the request itself.
        A request can fail because the server died a moment before libnbd's poller saw the
        socket close: give the poller a short while to notice before calling it the request's
        own error (which the container would get as EIO)."""
        if failed.errno in CONNECTION_ERRNOS:
            return True
        with trio.move_on_after(DEATH_NOTICE):
            while self.client.connected:
                await trio.sleep(0.01)
        return not self.client.connected

    async def _recover(self, failed: NBDError) -> None:
        if not await self._connection_lost(failed):
            raise failed  # the request itself failed; the connection is fine
        generation = self.reconnects
        async with self._reconnecting:
            if self.reconnects != generation:
                return  # another request reconnected while this one waited
            last: BaseException | None = None
            with trio.move_on_after(RECONNECT_TIMEOUT):
                while True:
                    try:
                        await self.qsd.wait_ready(RECONNECT_TIMEOUT)
                        await self.client.reconnect()
                        last = None
                        break
                    except BackendError as exc:
                        # The supervisor may not have noticed the dead QSD yet (it still looks
                        # ready and refuses connections): retry until it is back.
                        last = exc
                        await trio.sleep(0.1)
            if last is not None or not self.client.connected:
                raise NBDError(f"nbd: {self.client.label}: reconnect failed after "
                               f"{failed.message}", errno=errno.EIO) from last
            self.reconnects += 1
            log.info("reconnected to export", extra=fields(volume=self.client.export_name))

    async def _retried(self, request: Callable[[], Awaitable[T]]) -> T:
        """Run a request; after a lost connection, reconnect once and run it again."""
        try:
            return await request()
        except NBDError as exc:
            await self._recover(exc)
            return await request()

    async def read_at(self, offset: int, length: int) -> bytearray:
        return await self._retried(lambda: self.client.read_at(offset, length))

    async def write_at(self, offset: int, data: bytes) -> None:
        self.writes += 1
        await self._retried(lambda: self.client.write_at(offset, data))

    async def flush(self) -> None:
        await self._retried(self.client.flush)
