"""Exports: a volume served by the supervised qemu-storage-daemon, read by the gateway itself.

An exported volume has three parts: a named NBD export in QSD (with the catalog's pinned format),
one libnbd connection the gateway holds, and a `disk` file in the FUSE block view. The catalog
remembers which volumes are exported, so QSD (after a crash) and gatewayd (after a restart)
re-create them.

An export a mount made for itself lingers after the umount (`release`): for `linger` seconds it
stays open but idle, so a remount within that time (a container restarting) skips QSD's
blockdev and export setup and the NBD handshake, about 5 ms of a 13 ms warm mount. An idle
export is not desired state: the catalog forgets it, so a restarted gatewayd or QSD does not bring
it back. Anything that needs the image file to itself (volume removal, resize, using it as a
base) retires an idle export first with `retire`.

An idle export may hold a standby: the loop device of the bind mount that made it, still bound
to the rootfs window (see attachment.StandbyLoop). A remount through `claim` gets it back and
skips the loop setup too; every other way out of idleness (open, close, retirement) closes it
first.

`VolumeBackend` is what the block view and the probe read through. When QSD restarts, its
connection drops; the next request waits for QSD to be ready again, reconnects once and retries,
so a loop device over the block view sees a short stall instead of an I/O error.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import trio

from gateway.catalog import Catalog, Volume
from gateway.errors import BackendError, Conflict, NotFound
from gateway.log import fields
from gateway.nbd.client import NBDClient, NBDError
from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qsd import StorageDaemon

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from gateway.fuse.blockview import BlockView

    VolumeLocks = Callable[[str], AbstractAsyncContextManager[None]]

log = logging.getLogger("gateway.export.manager")
T = TypeVar("T")
RECONNECT_TIMEOUT = 15.0
CONNECTION_ERRNOS = frozenset({errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN})


def spec_of(volume: Volume, backing: ExportSpec | None = None) -> ExportSpec:
    fmt: Literal["raw", "qcow2"] = "qcow2" if volume.format == "qcow2" else "raw"
    return ExportSpec(name=volume.name, path=volume.path, fmt=fmt, read_only=volume.read_only,
                      block_device=volume.block_device, backing=backing,
                      file_id=volume.file_id)


def chain_spec(catalog: Catalog, volume: Volume, *, top: bool = True) -> ExportSpec:
    """The export spec of a volume with its backing chain, every layer pinned by the catalog.

    The recorded lineage must still match the catalog (name, path and format of each backing
    layer); anything else is refused rather than guessed. A base with overlays is always served
    read-only."""
    backing: ExportSpec | None = None
    if volume.base is not None:
        base = catalog.volume(volume.base)
        recorded = (volume.lineage.get("layers") or [{}])[0]
        if (recorded.get("name"), recorded.get("path"), recorded.get("format")) != (
                base.name, base.path, base.format):
            raise Conflict(f"volume {volume.name}: its base {base.name} no longer matches the "
                           "recorded lineage; refusing to open the chain")
        backing = dataclasses.replace(chain_spec(catalog, base, top=False), read_only=True)
    if top and catalog.overlays_of(volume.name) and not volume.read_only:
        raise Conflict(f"volume {volume.name} is the base of overlays "
                       f"{', '.join(catalog.overlays_of(volume.name))}; it is read-only")
    return spec_of(volume, backing)


class VolumeBackend:
    """The gateway's connection to one export, reconnecting across QSD restarts."""

    def __init__(self, client: NBDClient, qsd: StorageDaemon) -> None:
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

    async def _recover(self, failed: NBDError) -> None:
        if self.client.connected and failed.errno not in CONNECTION_ERRNOS:
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


@dataclass
class Export:
    volume: str
    uri: str
    backend: VolumeBackend


class Standby(Protocol):
    """What an idle export keeps for its next mount (the rootfs manager's standby loop)."""

    @property
    def device(self) -> str: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Idle:
    """A lingering export; its identity tells its retirement timer whether it was claimed."""

    standby: Standby | None = None

    async def close_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            await standby.close()


class Exports:
    """Owns QSD's exports and the gateway's own connections to them."""

    def __init__(self, catalog: Catalog, qsd: StorageDaemon, view: BlockView,
                 nursery: trio.Nursery, *, locks: VolumeLocks | None = None,
                 linger: float = 0.0) -> None:
        self.catalog = catalog
        self.qsd = qsd
        self.view = view
        self.nursery = nursery
        self.active: dict[str, Export] = {}
        self.idle: dict[str, _Idle] = {}  # lingering exports
        self.locks = locks
        self.linger = linger

    def in_use(self, name: str) -> bool:
        """Exported and not merely lingering after a mount."""
        return name in self.active and name not in self.idle

    @property
    def lingers(self) -> bool:
        """Whether `release` keeps exports (and standbys) idle rather than closing them."""
        return self.linger > 0 and self.locks is not None

    def standby_device(self, name: str) -> str | None:
        idle = self.idle.get(name)
        return idle.standby.device if idle is not None and idle.standby is not None else None

    def desired(self) -> list[ExportSpec]:
        """What QSD must export (read by QSD's supervisor when it restarts)."""
        specs = []
        for name in self.catalog.exported():
            try:
                specs.append(chain_spec(self.catalog, self.catalog.volume(name)))
            except (NotFound, Conflict):
                continue
        return specs

    def get(self, name: str) -> Export:
        export = self.active.get(name)
        if export is None:
            raise Conflict(f"volume {name} is not exported; run gatewayctl export {name}")
        return export

    async def open(self, name: str) -> Export:
        """Export a volume and connect to it (idempotent); claims a lingering export without its
        standby. Caller holds the volume lock."""
        export, standby = await self.claim(name)
        if standby is not None:
            await standby.close()
            await self.view.close_window(name)
        return export

    async def claim(self, name: str) -> tuple[Export, Standby | None]:
        """open() for a mount: a lingering export comes back with its standby, if it has one
        (the caller closes the standby when it does not take it)."""
        idle = self.idle.get(name)
        if idle is not None:
            export = self.active[name]
            if export.backend.client.connected:
                del self.idle[name]
                self.catalog.set_exported(name, True)
                return export, idle.standby
            await self.close(name)  # QSD restarted meanwhile and dropped it: start afresh
        if name in self.active:
            return self.active[name], None
        volume = self.catalog.volume(name)
        uri = await self.qsd.export(chain_spec(self.catalog, volume))
        try:
            client = await NBDClient.connect(str(self.qsd.nbd_path), name, nursery=self.nursery)
            try:
                backend = VolumeBackend(client, self.qsd)
                self.view.add_volume(name, backend)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self.catalog.set_exported(name, True)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.qsd.unexport(name, missing_ok=True, force=True)
            raise
        export = Export(name, uri, backend)
        self.active[name] = export
        log.info("volume exported", extra=fields(volume=name, uri=uri))
        return export, None

    async def release(self, name: str, standby: Standby | None = None) -> None:
        """The mount that made this export is gone: close it, or let it linger idle (keeping
        `standby` for the next mount)."""
        idle = _Idle(standby)
        export = self.active.get(name)
        if export is None or not self.lingers:
            await idle.close_standby()
            await self.close(name)
            return
        try:
            await export.backend.flush()
        except BaseException:
            with trio.CancelScope(shield=True):
                await idle.close_standby()
            raise
        self.idle[name] = idle
        self.catalog.set_exported(name, False)
        self.nursery.start_soon(self._retire_later, name, idle)

    async def _retire_later(self, name: str, idle: _Idle) -> None:
        assert self.locks is not None
        while True:
            await trio.sleep(self.linger)
            async with self.locks(name):
                if self.idle.get(name) is not idle:
                    return  # claimed by a mount, or closed already
                try:
                    await self.close(name)
                    return
                except Exception as exc:  # e.g. someone holds blk/NAME/disk open
                    log.error("retiring an idle export failed; trying again later",
                              extra=fields(volume=name, error=str(exc)))

    async def retire(self, name: str) -> None:
        """Close the export if it only lingers (no-op otherwise). Caller holds the volume lock."""
        if name in self.idle:
            await self.close(name)

    async def close(self, name: str, *, forget: bool = True) -> bool:
        """Disconnect and remove an export (idempotent); `forget` also clears the catalog."""
        export = self.active.get(name)
        if export is None:
            if forget:
                self.catalog.set_exported(name, False)
            await self.qsd.unexport(name, missing_ok=True)
            return False
        idle = self.idle.get(name)
        if idle is not None:
            await idle.close_standby()
        await self.view.remove_volume(name)  # refuses while its files are open: nothing changed
        del self.active[name]
        self.idle.pop(name, None)
        try:
            await export.backend.flush()
        finally:
            await export.backend.client.aclose()
            await self.qsd.unexport(name, missing_ok=True)
            if forget:
                self.catalog.set_exported(name, False)
        log.info("volume unexported", extra=fields(volume=name))
        return True

    async def restore(self) -> None:
        """Reconnect every export the catalog remembers (at start)."""
        for name in self.catalog.exported():
            try:
                await self.open(name)
            except Exception as exc:
                log.error("could not restore export",
                          extra=fields(volume=name, error=str(exc)))
                self.catalog.set_exported(name, False)

    async def close_all(self) -> None:
        for name in list(self.active):
            try:
                await self.close(name, forget=False)
            except Exception as exc:
                log.error("closing export failed", extra=fields(volume=name, error=str(exc)))
