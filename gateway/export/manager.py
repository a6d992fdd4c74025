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

The lifecycle is the table in gateway/export/states.py: each verb (open, claim, release, retire,
close, and the linger timer, the QSD restart and the shutdown behind them) is an event looked up
there, whose actions `Exports` runs by name; a volume's record holds its state, its export and
its idle period.

`VolumeBackend` is what the block view and the probe read through. When QSD restarts, its
connection drops; the next request waits for QSD to be ready again, reconnects once and retries,
so a loop device over the block view sees a short stall instead of an I/O error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import trio

from gateway.catalog import Catalog, Volume
from gateway.ceph.location import RbdImage
from gateway.errors import Conflict, GatewayError, NotFound
from gateway.export.backend import VolumeBackend
from gateway.export.states import ExportEvent, ExportState, transition
from gateway.log import fields
from gateway.nbd.client import NBDClient
from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qsd import StorageDaemon

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from gateway.export.view import View

    VolumeLocks = Callable[[str], AbstractAsyncContextManager[None]]

log = logging.getLogger("gateway.export.manager")


def spec_of(volume: Volume, backing: ExportSpec | None = None,
            rbd: RbdImage | None = None) -> ExportSpec:
    fmt: Literal["raw", "qcow2"] = "qcow2" if volume.format == "qcow2" else "raw"
    return ExportSpec(name=volume.name, path=volume.path, fmt=fmt, read_only=volume.read_only,
                      block_device=volume.block_device, backing=backing,
                      file_id=volume.file_id, rbd=rbd)


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
    return spec_of(volume, backing, catalog.rbd_image(volume.name))


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
    """One idle period of an export; its identity tells its linger timer whether it still runs."""

    standby: Standby | None = None
    # Set when the idle period ends (claimed, closed, expired): its linger timer returns at once
    # instead of sleeping out the linger (a task per umount grew gatewayd ~3 KiB per cycle).
    over: trio.Event = field(default_factory=trio.Event)

    async def close_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            await standby.close()


@dataclass(eq=False)
class _Record:
    """A volume's export: its state (SERVING or IDLE; ABSENT has no record), the export, and the
    idle period while it lingers."""

    state: ExportState
    export: Export
    idle: _Idle | None = None


@dataclass(eq=False)
class _Call:
    """What one verb's actions work on."""

    name: str
    export: Export | None = None   # the record's, or the one "connect" made
    idle: _Idle | None = None      # the record's idle period when the verb started
    given: Standby | None = None   # handed in by a release: closed unless an idle period keeps it
    handed: Standby | None = None  # taken back by a claim, for the caller

    async def close_given(self) -> None:
        given, self.given = self.given, None
        if given is not None:
            await given.close()


class Exports:
    """Owns QSD's exports and the gateway's own connections to them: one record per exported
    volume, moved only through the table in gateway/export/states.py."""

    def __init__(self, catalog: Catalog, qsd: StorageDaemon, view: View,
                 nursery: trio.Nursery, *, locks: VolumeLocks | None = None,
                 linger: float = 0.0) -> None:
        self.catalog = catalog
        self.qsd = qsd
        self.view = view
        self.nursery = nursery
        self._records: dict[str, _Record] = {}
        self.locks = locks
        self.linger = linger

    def state(self, name: str) -> ExportState:
        record = self._records.get(name)
        return ExportState.ABSENT if record is None else record.state

    @property
    def active(self) -> Mapping[str, Export]:
        """Every export the gateway holds, serving or idle."""
        return {name: record.export for name, record in self._records.items()}

    @property
    def idle(self) -> frozenset[str]:
        """The volumes whose export lingers after a mount's umount."""
        return frozenset(n for n, r in self._records.items() if r.state is ExportState.IDLE)

    def in_use(self, name: str) -> bool:
        """Exported and not merely lingering after a mount."""
        return self.state(name) is ExportState.SERVING

    @property
    def lingers(self) -> bool:
        """Whether `release` keeps exports (and standbys) idle rather than closing them."""
        return self.linger > 0 and self.locks is not None

    def standby_device(self, name: str) -> str | None:
        record = self._records.get(name)
        idle = record.idle if record is not None else None
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

    def find(self, name: str) -> Export | None:
        """The export the gateway holds for `name` (serving or idle), if any."""
        record = self._records.get(name)
        return record.export if record is not None else None

    def get(self, name: str) -> Export:
        export = self.find(name)
        if export is None:
            raise Conflict(f"volume {name} is not exported; run gatewayctl export {name}")
        return export

    # The verbs. Callers hold the volume lock (but close_all, at shutdown).
    async def open(self, name: str) -> Export:
        """Export a volume and connect to it (idempotent); takes a lingering export over, without
        its standby."""
        await self._drop_if_stale(name)
        return _made(await self._fire(name, ExportEvent.OPEN))

    async def claim(self, name: str) -> tuple[Export, Standby | None]:
        """open() for a mount: a lingering export comes back with its standby, if it has one
        (the caller closes the standby when it does not take it)."""
        await self._drop_if_stale(name)
        call = await self._fire(name, ExportEvent.CLAIM)
        return _made(call), call.handed

    async def release(self, name: str, standby: Standby | None = None) -> None:
        """The mount that made this export is gone: close it, or let it linger idle (keeping
        `standby` for the next mount). `standby` is closed whenever it is not kept."""
        event = ExportEvent.RELEASE if self.lingers else ExportEvent.RELEASE_NOW
        await self._fire(name, event, given=standby)

    async def retire(self, name: str) -> None:
        """Close the export if it only lingers (no-op otherwise)."""
        await self._fire(name, ExportEvent.RETIRE)

    async def close(self, name: str, *, forget: bool = True) -> bool:
        """Disconnect and remove an export (idempotent); `forget` also clears the catalog.
        Whether the gateway held it."""
        held = name in self._records
        await self._fire(name, ExportEvent.CLOSE if forget else ExportEvent.SHUTDOWN)
        return held

    async def drop(self, name: str) -> None:
        """Close an export whose node fails every request (a fenced RBD volume), with no flush:
        its standby, the block view's volume, gatewayd's connection and QSD's export go whatever
        fails, and the catalog forgets it. The data plane drops the volume before its own flush
        fails, so a second unplug finds it gone and settles the view. Caller holds the lock."""
        record = self._records.pop(name, None)
        self.catalog.set_exported(name, False)
        if record is not None and record.idle is not None:
            record.idle.over.set()
            await record.idle.close_standby()
        if name in self.view.volumes():
            try:
                await self.view.unplug(name, force=True)
            except GatewayError:
                await self.view.unplug(name, force=True)
        if record is not None:
            with contextlib.suppress(GatewayError):
                await record.export.backend.client.aclose()
        await self.qsd.unexport(name, missing_ok=True, force=True)
        log.warning("fenced export dropped", extra=fields(volume=name))

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
        for name in list(self._records):
            try:
                await self.close(name, forget=False)
            except Exception as exc:
                log.error("closing export failed", extra=fields(volume=name, error=str(exc)))

    async def _drop_if_stale(self, name: str) -> None:
        """An idle export whose connection QSD dropped (it restarted, and an idle export is not
        desired, so it did not come back) is closed, to start afresh."""
        record = self._records.get(name)
        if (record is not None and record.state is ExportState.IDLE
                and not record.export.backend.client.connected):
            await self._fire(name, ExportEvent.QSD_RESTART)

    async def _expire_later(self, name: str, idle: _Idle) -> None:
        assert self.locks is not None
        while True:
            with trio.move_on_after(self.linger):
                await idle.over.wait()
            if idle.over.is_set():
                return  # claimed by a mount, or closed already
            async with self.locks(name):
                record = self._records.get(name)
                if record is None or record.idle is not idle:
                    return  # claimed by a mount, or closed already
                try:
                    await self._fire(name, ExportEvent.EXPIRE)
                    return
                except Exception as exc:  # e.g. someone holds blk/NAME/disk open
                    log.error("retiring an idle export failed; trying again later",
                              extra=fields(volume=name, error=str(exc)))

    # The engine: look the verb up, run its actions, move the record.
    async def _fire(self, name: str, event: ExportEvent, *,
                    given: Standby | None = None) -> _Call:
        record = self._records.get(name)
        step = transition(record.state if record is not None else ExportState.ABSENT, event)
        call = _Call(name, given=given)
        if record is not None:
            call.export, call.idle = record.export, record.idle
        try:
            for action in step.before:
                await ACTION_RUNNERS[action](self, call)
        except BaseException:
            with trio.CancelScope(shield=True):
                await call.close_given()
            raise
        self._settle(call, step.state)
        failure: BaseException | None = None
        for action in step.after:
            try:
                await ACTION_RUNNERS[action](self, call)
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        if record is not None and step.state is ExportState.ABSENT:
            log.info("volume unexported", extra=fields(volume=name, event=event.value))
        return call

    def _settle(self, call: _Call, state: ExportState) -> None:
        old = self._records.get(call.name)
        if old is not None and old.idle is not None:
            old.idle.over.set()  # whatever comes next, this idle period is over
        if state is ExportState.ABSENT:
            self._records.pop(call.name, None)
            return
        record = self._records.get(call.name)
        if record is None:
            record = self._records[call.name] = _Record(state, _made(call))
        record.state = state
        if state is ExportState.IDLE:
            record.idle = call.idle = _Idle(call.given)
            call.given = None
        else:
            record.idle = None

    # The actions (states.ACTIONS says what each does).
    async def _connect(self, call: _Call) -> None:
        name = call.name
        volume = self.catalog.volume(name)
        uri = await self.qsd.export(chain_spec(self.catalog, volume))
        try:
            client = await NBDClient.connect(str(self.qsd.nbd_path), name, nursery=self.nursery)
            try:
                backend = VolumeBackend(client, self.qsd)
                # The block view (in the data plane) has its own connection to the export;
                # gatewayd's is for the probe, resizes and flushes.
                await self.view.plug(name, str(self.qsd.nbd_path), name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self.catalog.set_exported(name, True)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.qsd.unexport(name, missing_ok=True, force=True)
            raise
        call.export = Export(name, uri, backend)
        log.info("volume exported", extra=fields(volume=name, uri=uri))

    async def _want(self, call: _Call) -> None:
        self.catalog.set_exported(call.name, True)

    async def _forget(self, call: _Call) -> None:
        self.catalog.set_exported(call.name, False)

    async def _flush(self, call: _Call) -> None:
        await _made(call).backend.flush()

    async def _unview(self, call: _Call) -> None:
        await self.view.unplug(call.name)  # refuses while its files are open

    async def _hang_up(self, call: _Call) -> None:
        await _made(call).backend.client.aclose()

    async def _unexport(self, call: _Call) -> None:
        await self.qsd.unexport(call.name, missing_ok=True)

    async def _close_given(self, call: _Call) -> None:
        await call.close_given()

    async def _close_standby(self, call: _Call) -> None:
        if call.idle is not None:
            await call.idle.close_standby()

    async def _drop_standby(self, call: _Call) -> None:
        idle = call.idle
        if idle is not None and idle.standby is not None:
            await idle.close_standby()
            await self.view.close_window(call.name)

    async def _hand_standby(self, call: _Call) -> None:
        if call.idle is not None:
            call.handed, call.idle.standby = call.idle.standby, None

    async def _expire_later_action(self, call: _Call) -> None:
        assert call.idle is not None
        self.nursery.start_soon(self._expire_later, call.name, call.idle)


def _made(call: _Call) -> Export:
    assert call.export is not None, f"export {call.name}: no export past connect"
    return call.export


ACTION_RUNNERS: Mapping[str, Callable[[Exports, _Call], Awaitable[None]]] = {
    "connect": Exports._connect,
    "want": Exports._want,
    "forget": Exports._forget,
    "flush": Exports._flush,
    "unview": Exports._unview,
    "hang-up": Exports._hang_up,
    "unexport": Exports._unexport,
    "close-given": Exports._close_given,
    "close-standby": Exports._close_standby,
    "drop-standby": Exports._drop_standby,
    "hand-standby": Exports._hand_standby,
    "expire-later": Exports._expire_later_action,
}
