"""What gatewayd's export and rootfs managers ask of the block view, wherever it runs.

`gateway.export.view.View` is that surface: plug a volume's NBD export in as NAME/disk, open and
close its rootfs window, unplug it, and tell how many writes went through it. Two implementations:

- `RemoteView`: the block view lives in the data-plane process (gateway.dataplane.service) and is
  driven over its control socket. This is what gatewayd uses: the view, and with it every
  container's I/O, outlives gatewayd.
- `LocalView`: an in-process BlockView (tests and tools that have no data plane).

Window and volume lists are answered from what the last calls returned (the managers ask them
often, on the trio thread); `RemoteView.refresh()` reloads them from the data plane (adoption
after a gatewayd restart).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from gateway import errors
from gateway.admin.client import error_for
from gateway.admin.protocol import NEED_DATA, ClientConnection, Closed, ConnectionFailed, Response
from gateway.export.backend import Ready, VolumeBackend
from gateway.fuse.blockview import BlockView
from gateway.nbd.client import NBDClient

log = logging.getLogger("gateway.dataplane.view")
CALL_TIMEOUT = 60.0


class LocalView:
    """An in-process block view: NBD connections in gatewayd's own nursery."""

    def __init__(self, view: BlockView, nursery: trio.Nursery, qsd: Ready) -> None:
        self.view = view
        self.nursery = nursery
        self.qsd = qsd
        self.backends: dict[str, VolumeBackend] = {}

    async def plug(self, name: str, socket: str, export: str) -> None:
        client = await NBDClient.connect(socket, export, nursery=self.nursery)
        try:
            backend = VolumeBackend(client, self.qsd)
            self.view.add_volume(name, backend)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        self.backends[name] = backend

    async def unplug(self, name: str, *, force: bool = False) -> None:
        backend = self.backends.get(name)
        if backend is None:
            return
        await self.view.remove_volume(name, force=force)
        del self.backends[name]
        try:
            await backend.flush()
        finally:
            await backend.client.aclose()

    async def set_window(self, name: str, start: int, size: int) -> None:
        self.view.set_window(name, start, size)

    async def close_window(self, name: str) -> None:
        await self.view.close_window(name)

    async def writes(self, name: str) -> int:
        backend = self.backends.get(name)
        return backend.writes if backend is not None else 0

    def window(self, name: str) -> tuple[int, int] | None:
        return self.view.window(name) if name in self.backends else None

    def volumes(self) -> list[str]:
        return sorted(self.backends)


class RemoteView:
    """The data plane's block view, over its control socket (a connection per request: requests
    for different volumes run in parallel, as the data plane serves them)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._windows: dict[str, tuple[int, int] | None] = {}

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """One request on a fresh connection; errors come back as the data plane's types, and
        a data plane that cannot be reached is a BackendError naming it."""
        conn = ClientConnection()
        try:
            with trio.fail_after(CALL_TIMEOUT):
                stream = await trio.open_unix_socket(self.socket_path)
                async with stream:
                    await stream.send_all(conn.send(op, args))
                    while (event := conn.next_event()) is NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise errors.BackendError(f"data plane at {self.socket_path}: {op} failed: "
                                      f"{getattr(exc, 'strerror', None) or exc!r}") from exc
        if isinstance(event, Response):
            if event.ok:
                return event.result
            raise error_for(event.code, f"data plane: {event.message}")
        what = "closed the connection" if isinstance(event, Closed) else (
            event.message if isinstance(event, ConnectionFailed) else "sent nothing")
        raise errors.BackendError(f"data plane at {self.socket_path}: {op}: {what}")

    def _remember(self, status: dict[str, Any]) -> None:
        window = status.get("window")
        self._windows[str(status["name"])] = (
            (int(window[0]), int(window[1])) if isinstance(window, list) else None)

    async def status(self) -> dict[str, Any]:
        result = await self.call("status")
        assert isinstance(result, dict)
        return result

    async def refresh(self) -> dict[str, Any]:
        """Reload what the data plane serves; returns its status."""
        status = await self.status()
        self._windows.clear()
        for volume in status.get("volumes", {}).values():
            self._remember(volume)
        return status

    async def plug(self, name: str, socket: str, export: str) -> None:
        self._remember(await self.call("plug", {"name": name, "socket": socket,
                                                "export": export}))

    async def unplug(self, name: str, *, force: bool = False) -> None:
        await self.call("unplug", {"name": name, "force": force})
        self._windows.pop(name, None)

    async def set_window(self, name: str, start: int, size: int) -> None:
        self._remember(await self.call("set-window", {"name": name, "start": start,
                                                      "size": size}))

    async def close_window(self, name: str) -> None:
        self._remember(await self.call("close-window", {"name": name}))

    async def writes(self, name: str) -> int:
        status = await self.status()
        volume = status.get("volumes", {}).get(name)
        return int(volume["writes"]) if isinstance(volume, dict) else 0

    def window(self, name: str) -> tuple[int, int] | None:
        return self._windows.get(name)

    def volumes(self) -> list[str]:
        return sorted(self._windows)
