"""Rootfs attachments: a registered volume turned into RUN_DIR/rootfs/VOL for libvirt-lxc.

mount: export the volume (if needed) -> probe its disk through the export -> pin or check the
filesystem type -> expose the rootfs window in the block view -> bind mode (loop, kernel mount,
bind) or fuse mode (fuse2fs). Every step is written to the catalog's journal before it is taken,
so a gatewayd that starts after a crash knows what to tear down (`reconcile_all`). What a finished
step found (its "done" entry) rides along with the next write: reconcile also scans for what a
step leaves behind, so only the "start" entries are crash points.

umount: verified teardown (umount, loop detach, fuse2fs exit), then the window closes, NBD is
flushed, and an export the mount made itself is removed again, or lingers idle (see exports).
A bind mount's idle export keeps its loop device bound to the window as a standby: a remount that
finds the same window mounts on it and skips the loop setup.

Blocking steps (mount(2), loop ioctls, fuse2fs start, anything that may read the block view) run in
worker threads: the trio thread serves the block view's FUSE requests and must never wait on them.
Each volume has its own lock; different volumes mount in parallel.

A record's state (attaching, mounted, failed, detaching) changes only through the table in
gateway/attach/states.py; its journal entries are the typed records of gateway/attach/journal.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.attach import attachment
from gateway.attach import journal as records
from gateway.attach.journal import ExportStep, HostViewReleased, Phase
from gateway.attach.states import SERVING, AttachmentEvent, AttachmentState, transition
from gateway.catalog import AttachmentRecord, Catalog
from gateway.errors import GatewayError, InvalidArgument, ProbeError
from gateway.log import fields
from gateway.probe.core import probe_reader_async
from gateway.tenants import ids as tenant_ids
from gateway.userns import ranges, slices
from gateway.userns.slices import IdMap, IdRange

if TYPE_CHECKING:
    from gateway.export.manager import Exports
    from gateway.export.view import View

log = logging.getLogger("gateway.attach.manager")
MODES = ("bind", "fuse")
FUSE_FSTYPES = ("ext2", "ext3", "ext4")


@dataclass
class _Standby:
    """A standby loop device of an idle export, and the window it serves."""

    loop: attachment.StandbyLoop
    window: tuple[int, int]
    writes: int  # the backend's write count when the filesystem was unmounted

    @property
    def device(self) -> str:
        return self.loop.device

    async def close(self) -> None:
        # the last close may write back through the block view: not on its trio thread
        await trio.to_thread.run_sync(self.loop.close)


@dataclass
class Phases:
    """Seconds spent in each mount phase (for metrics and the closing notes)."""

    timings: dict[str, float]

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.timings.items()}


class RootfsManager:
    def __init__(self, run_dir: Path, catalog: Catalog, exports: Exports, view: View,
                 locks: Any, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.run_dir = run_dir
        self.layout = attachment.RunLayout(run_dir)
        self.catalog = catalog
        self.exports = exports
        self.view = view
        self.locks = locks
        self.active: dict[str, attachment.Attachment] = {}
        self.last_phases: dict[str, dict[str, float]] = {}
        self.on_phase: list[Any] = []  # callbacks (phase, seconds) for metrics
        # gatewayd's --userns-range; None: the /etc/subuid entry of ranges.DEFAULT_USER
        self.userns_range: IdRange | None = None

    def attachment_of(self, name: str) -> dict[str, Any] | None:
        record = self.catalog.attachment(name)
        if record is None:
            return None
        ids = self.catalog.userns_slice(name)
        return {**record.to_json(), "idmap": ids.to_json()} if ids is not None else record.to_json()

    async def _slice_picker(self, ids: IdMap | None,
                            tenant: str | None = None) -> Callable[[list[IdMap]], IdMap]:
        """What chooses a new attachment's slice (run inside the catalog's transaction): the
        lowest free slot of the range (a `tenant`'s: its own /etc/subuid and /etc/subgid
        entries), or the explicit map `ids` once checked. Reads the host's id files in a worker
        thread; a missing range is refused here, before anything starts."""
        if tenant is not None:
            source = await trio.to_thread.run_sync(tenant_ids.load, tenant)
        else:
            source = await trio.to_thread.run_sync(ranges.load, self.userns_range)
        reserved = source.reserved

        def pick(taken: list[IdMap]) -> IdMap:
            if ids is not None:
                return slices.check_requested(source.id_range, ids, taken, reserved.uids,
                                              reserved.gids)
            return slices.allocate(source.id_range, taken, reserved.uids, reserved.gids)
        return pick

    def _check_idmap(self, name: str, userns: bool, ids: IdMap | None) -> IdMap | None:
        """A mounted volume serves a request only with the same kind of map."""
        current = self.catalog.userns_slice(name)
        if userns != (current is not None):
            raise InvalidArgument(f"volume {name} is already mounted "
                                  f"{'with' if current is not None else 'without'} --userns; "
                                  "umount it first")
        if ids is not None and current != ids:
            assert current is not None
            raise InvalidArgument(f"volume {name} is already mounted with the id map uid "
                                  f"{current.uid_first} gid {current.gid_first}, not uid "
                                  f"{ids.uid_first} gid {ids.gid_first}")
        return current

    def _move(self, name: str, state: AttachmentState, event: AttachmentEvent,
              steps: list[records.Entry] | None = None) -> AttachmentState:
        """Move the volume's attachment from `state` through the table, and record where it
        went (ABSENT: the record goes)."""
        new = transition(state, event)
        if new is AttachmentState.ABSENT:
            self.catalog.end_attachment(name)
        elif new is not state or steps:
            self.catalog.set_attachment(name, state=new, steps=steps or ())
        return new

    def _move_after_failure(self, name: str, state: AttachmentState,
                            event: AttachmentEvent) -> None:
        """_move on the way out of a failed step: a failure to record it is logged, and the
        step's own error is what the caller sees."""
        try:
            self._move(name, state, event)
        except GatewayError as exc:
            log.error("recording the attachment state failed",
                      extra=fields(volume=name, event=event.value, error=exc.message))

    def _journal(self, name: str, token: trio.lowlevel.TrioToken, pending: list[records.Entry],
                 phases: dict[str, float]) -> attachment.Journal:
        """The attach steps' journal, called from the worker thread: a step about to start is
        written at once, together with the results of the steps before it; results after the
        last start stay in `pending`. Each step's time from start to done goes to `phases`."""
        started: dict[str, float] = {}

        def write(step: str, detail: dict[str, object]) -> None:
            entry = records.decode(step, detail)
            phase = records.phase_of(entry)
            now = time.perf_counter()
            if phase is Phase.START:
                started[step] = now
            elif step in started:
                phases[step] = now - started.pop(step)
            pending.append(entry)
            if phase is not Phase.DONE:
                # The catalog lives on the trio thread.
                steps = pending[:]
                pending.clear()
                trio.from_thread.run_sync(self.catalog.journal_steps, name, steps,
                                          trio_token=token)
        return write

    async def mount(self, name: str, mode: str, *, userns: bool = False,
                    ids: IdMap | None = None, domain: str | None = None,
                    tenant: str | None = None) -> dict[str, Any]:
        """Deliver RUN_DIR/rootfs/NAME. `userns`: with an id slice of its own (bind mode: an
        idmapped mount; fuse mode: the id-shifting layer over fuse2fs), the lowest free one
        of the range (of the `tenant` user's own subordinate ids, when a tenant asks) or `ids`
        (a domain that names its map); `domain` is recorded with the slice."""
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}: choose bind or fuse")
        userns = userns or ids is not None
        async with self.locks(name):
            volume = self.catalog.volume(name)
            record = self.catalog.attachment(name)
            rootfs = str(self.layout.rootfs(name))
            if record is not None and record.state in SERVING:
                if await self._still_mounted(name, record.mode, record.entries):
                    if record.mode != mode:
                        raise InvalidArgument(f"volume {name} is already mounted in "
                                              f"{record.mode} mode; umount it first")
                    current = self._check_idmap(name, userns, ids)
                    same = {"name": name, "rootfs": record.rootfs, "mode": record.mode}
                    return same if current is None else {**same, "idmap": current.to_json()}
                # Unmounted behind our back (or never ours): never hand out an empty directory.
                log.warning("a mounted volume's rootfs is gone; mounting it afresh",
                            extra=fields(volume=name, mode=record.mode, rootfs=rootfs))
                await self._teardown(record, force=True)
                record = None
            if record is not None:
                await self._teardown(record, force=False)
            if mode == "fuse" and volume.fstype and volume.fstype not in FUSE_FSTYPES:
                raise InvalidArgument(f"fuse mode serves ext2/3/4 only; volume {name} holds "
                                      f"{volume.fstype}")
            pick = await self._slice_picker(ids, tenant) if userns else None
            phases: dict[str, float] = {}
            auto_export = not self.exports.in_use(name)
            self.catalog.begin_attachment(
                name, mode, rootfs, [ExportStep(auto_export)],
                state=transition(AttachmentState.ABSENT, AttachmentEvent.BEGIN))
            standby: _Standby | None = None
            claimed: IdMap | None = None
            try:
                if pick is not None:
                    claimed = self.catalog.claim_slice(name, pick, domain)
                t = time.perf_counter()
                export, kept = await self.exports.claim(name)
                standby = kept if isinstance(kept, _Standby) else None
                if kept is not None and standby is None:
                    await kept.close()  # not one of ours: nothing to reuse
                phases["export"] = time.perf_counter() - t

                t = time.perf_counter()
                found = await probe_reader_async(export.backend.read_at, export.backend.size)
                phases["probe"] = time.perf_counter() - t
                fstype = found.rootfs.fs or "unknown"
                if volume.fstype is not None and volume.fstype != fstype:
                    raise ProbeError(f"volume {name}: the probe found {fstype} but the catalog "
                                     f"pins {volume.fstype}; refusing to mount")
                if mode == "fuse" and fstype not in FUSE_FSTYPES:
                    raise InvalidArgument(f"fuse mode serves ext2/3/4 only; volume {name} "
                                          f"holds {fstype}")
                if volume.fstype is None:
                    self.catalog.pin_fstype(name, fstype)

                t = time.perf_counter()
                window = (found.rootfs.start, found.rootfs.size)
                if standby is not None and (mode != "bind" or standby.window != window
                                            or standby.loop.read_only != volume.read_only):
                    await standby.close()
                    standby = None
                    await self.view.close_window(name)
                if standby is None:
                    await self.view.set_window(name, *window)
                self.catalog.set_attachment(name, window=window)
                phases["window"] = time.perf_counter() - t

                # The standby's cached blocks are only as fresh as the disk: any write since the
                # umount (the disk file, another window) and they are dropped.
                cached = standby is not None and standby.writes == await self.view.writes(name)
                done: list[records.Entry] = []  # journal entries still to write
                att = await self._attach(name, mode, fstype, volume.read_only, volume.nosuid,
                                         volume.noexec, phases,
                                         standby.loop if standby is not None else None, cached,
                                         done, claimed)
                self.active[name] = att
                self._move(name, AttachmentState.ATTACHING, AttachmentEvent.ATTACHED, done)
                self._watch_fuse2fs(name, att)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if standby is not None:
                        await standby.close()
                    await self._undo(name, auto_export)
                raise
        self.last_phases[name] = phases
        for callback in self.on_phase:
            for phase, seconds in phases.items():
                callback(phase, seconds)
        idmap_json = claimed.to_json() if claimed is not None else None
        log.info("rootfs mounted", extra=fields(volume=name, mode=mode, fstype=fstype,
                                                rootfs=rootfs, phases=Phases(phases).to_json(),
                                                idmap=idmap_json))
        answer = {"name": name, "rootfs": rootfs, "mode": mode}
        return answer if idmap_json is None else {**answer, "idmap": idmap_json}

    async def _attach(self, name: str, mode: str, fstype: str, read_only: bool, nosuid: bool,
                      noexec: bool, phases: dict[str, float],
                      standby: attachment.StandbyLoop | None, standby_cache: bool,
                      pending: list[records.Entry],
                      ids: IdMap | None = None) -> attachment.Attachment:
        write = self._journal(name, trio.lowlevel.current_trio_token(), pending, phases)
        force_fsck = self.catalog.fsck_needed(name)

        def work() -> attachment.Attachment:
            if mode == "bind":
                return attachment.attach_bind(self.run_dir, name, fstype, journal=write,
                                              read_only=read_only, nosuid=nosuid, noexec=noexec,
                                              standby=standby, standby_cache=standby_cache,
                                              ids=ids)
            return attachment.attach_fuse(
                self.run_dir, name, fstype, journal=write, read_only=read_only, nosuid=nosuid,
                noexec=noexec, stderr_path=str(self.run_dir / f"fuse2fs-{name}.log"),
                force_fsck=force_fsck, ids=ids,
                shift_stderr_path=str(self.run_dir / f"idshift-{name}.log"))
        att = await trio.to_thread.run_sync(work)
        if mode == "fuse" and force_fsck and not read_only:
            self.catalog.set_fsck_needed(name, False)
        return att

    async def _undo(self, name: str, auto_export: bool) -> None:
        """Undo a failed mount: attach_* cleaned up after itself; close the window and export."""
        try:
            if name in self.view.volumes():
                await self.view.close_window(name)
            if auto_export:
                await self.exports.close(name)
        except GatewayError as exc:
            log.error("cleanup after failed mount failed", extra=fields(volume=name,
                                                                         error=exc.message))
        finally:
            self._move(name, AttachmentState.ATTACHING, AttachmentEvent.ABORT)

    async def umount(self, name: str, *, force: bool = False) -> dict[str, Any]:
        async with self.locks(name):
            self.catalog.volume(name)
            record = self.catalog.attachment(name)
            if record is None:
                return {"name": name, "mounted": False}
            await self._teardown(record, force=force)
        log.info("rootfs unmounted", extra=fields(volume=name, force=force))
        return {"name": name, "mounted": False}

    async def _teardown(self, record: AttachmentRecord, *, force: bool,
                        flush: bool = True) -> None:
        """`flush=False` (a fenced volume, whose export fails every request): no flush and no
        standby loop; its export is left to the caller."""
        name, entries = record.volume, record.entries
        auto = records.made_own_export(entries)
        state = self._move(name, record.state, AttachmentEvent.DETACH)
        att = self.active.pop(name, None)
        standby: _Standby | None = None
        if att is not None:
            keep = flush and auto and self.exports.lingers and att.mode == attachment.BIND
            try:
                loop = await trio.to_thread.run_sync(
                    lambda: attachment.detach(att, force=force, keep_loop=keep))
            except BaseException:
                self.active[name] = att
                self._move_after_failure(name, state, AttachmentEvent.DETACH_FAILED)
                raise
            window = self.view.window(name) if name in self.view.volumes() else None
            export = self.exports.find(name)
            if loop is not None and window is not None and export is not None:
                standby = _Standby(loop, window, await self.view.writes(name))
            elif loop is not None:
                await trio.to_thread.run_sync(loop.close)
        try:
            if att is None:
                report = await trio.to_thread.run_sync(
                    lambda: attachment.reconcile(self.run_dir, name, entries))
                if report.remaining:
                    raise attachment.TeardownIncomplete(name, report.remaining)
            try:
                if name in self.view.volumes():
                    if standby is None:
                        await self.view.close_window(name)
                    export = self.exports.find(name)
                    if export is not None and flush:
                        await export.backend.flush()
            except BaseException:
                if standby is not None:
                    with trio.CancelScope(shield=True):
                        await standby.close()
                raise
            if auto and flush:
                await self.exports.release(name, standby)
            elif standby is not None:
                await standby.close()
        except BaseException:
            self._move_after_failure(name, state, AttachmentEvent.CLEANUP_FAILED)
            raise
        self._move(name, state, AttachmentEvent.DETACHED)

    async def adopt(self, name: str, att: attachment.Attachment) -> None:
        """Take over an attachment a previous gatewayd left whole (attachment.adoptable): its
        export is claimed again (gatewayd's own connection; QSD and the data plane kept theirs),
        and from then on it is served, watched and torn down like one this gatewayd made."""
        async with self.locks(name):
            record = self.catalog.attachment(name)
            if record is None:
                return
            state = self._move(name, record.state, AttachmentEvent.ADOPT)
            try:
                await self.exports.claim(name)
            except BaseException:
                self._move_after_failure(name, state, AttachmentEvent.LOST)
                raise
            self.active[name] = att
            self._move(name, state, AttachmentEvent.VERIFIED)
            self._watch_fuse2fs(name, att)
        log.info("attachment adopted", extra=fields(volume=name, mode=att.mode,
                                                    loop=att.loop, fuse2fs=att.fuse2fs_pid))

    def _watch_fuse2fs(self, name: str, att: attachment.Attachment) -> None:
        """Notice a fuse2fs (or fuse mode's id-shifting layer) that dies on its own, and tear
        down what is left of its mount."""
        for pid in att.data_pids:
            self._watch_pid(name, att, pid)

    def _watch_pid(self, name: str, att: attachment.Attachment, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return

        async def watch() -> None:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
            if self.active.get(name) is not att:
                return  # an ordinary teardown stopped it
            what = "fuse2fs" if pid == att.fuse2fs_pid else "idshift"
            log.error(f"{what} exited on its own; tearing the mount down",
                      extra=fields(volume=name, pid=pid))
            await self.lose(name, f"{what} exited")

        self.nursery.start_soon(watch)

    async def lose(self, name: str, why: str) -> bool:
        """The data path under `name`'s mount died (its fuse2fs, or the data plane): record the
        attachment lost and tear down what is left of it, forcibly. Whether it was mounted."""
        att = self.active.get(name)
        record = self.catalog.attachment(name)
        if record is None:
            return False
        self._move_after_failure(name, record.state, AttachmentEvent.LOST)
        if att is None or att.mode == attachment.FUSE:
            self.catalog.set_fsck_needed(name, True)  # fuse2fs keeps no journal
        try:
            await self.umount(name, force=True)
        except GatewayError as exc:
            log.error("teardown after a lost data path failed",
                      extra=fields(volume=name, why=why, error=exc.message))
        return True

    async def drop_fenced(self, name: str) -> bool:
        """A fenced RBD volume (another host took its writer lease; its QSD node fails every
        request): tear its mount down forcibly without the flushes that would fail, recorded as
        lost; its export is the caller's (Exports.drop). Whether it was mounted."""
        async with self.locks(name):
            record = self.catalog.attachment(name)
            if record is None:
                return False
            self._move_after_failure(name, record.state, AttachmentEvent.LOST)
            att = self.active.get(name)
            if att is None or att.mode == attachment.FUSE:
                self.catalog.set_fsck_needed(name, True)  # fuse2fs keeps no journal
            record = self.catalog.attachment(name)
            if record is not None:
                await self._teardown(record, force=True, flush=False)
        log.warning("fenced volume unmounted", extra=fields(volume=name))
        return True

    async def release_host_view(self, name: str) -> None:
        """nova's clean_lxc_namespace: drop the host's bind at RUN_DIR/rootfs/VOL once the
        container runs, and the private kernel mount at RUN_DIR/mnt/VOL behind it; the container
        keeps its own copy of the mount, and with it the filesystem."""
        from gateway.libvirt.hostview import release_host_view
        async with self.locks(name):
            paths = (self.layout.rootfs(name), self.layout.mnt(name))
            released = await trio.to_thread.run_sync(
                lambda: [release_host_view(p) for p in paths])
            self.catalog.journal(name, HostViewReleased(tuple(str(p) for p in paths),
                                                        tuple(released)))

    async def unmount_all(self) -> None:
        for name in list(self.active):
            try:
                await self.umount(name)
            except GatewayError as exc:
                log.error("umount at shutdown failed", extra=fields(volume=name,
                                                                    error=exc.message))
                try:
                    await self.umount(name, force=True)
                except GatewayError as exc2:
                    log.error("forced umount failed", extra=fields(volume=name,
                                                                   error=exc2.message))

    async def _still_mounted(self, name: str, mode: str, entries: list[records.Entry]) -> bool:
        """Whether a "mounted" record still holds: RUN_DIR/rootfs/NAME is, on top, the mount
        this gatewayd made there (fuse: a fuse2fs mount while our handle's process lives; bind:
        a mount of the attachment's loop device). Once the host view was released (a running
        container keeps its own copy) only the backend is checked: our fuse2fs lives, or the
        loop device still serves the volume's window. Reads mountinfo in a worker thread."""
        from gateway.host import fuse2fs, loopdev, mounts
        from gateway.idshift import process as idshift
        att = self.active.get(name)
        if att is None or att.mode != mode:
            return False
        released = records.host_view_released(entries)
        target, mnt = self.layout.rootfs(name), self.layout.mnt(name)
        window = str(self.layout.window(name))

        def check() -> bool:
            if att.mode == attachment.FUSE:
                if att.fuse is None or not att.fuse.alive():
                    return False
                if att.idmap is not None and (att.shift is None or not att.shift.alive()):
                    return False
            elif released:
                return att.loop is not None and loopdev.backing_file(att.loop) == window
            if released:
                return True
            here = mounts.mounts_at(target)
            below = {m.parent_id for m in here}
            top = [m for m in here if m.mount_id not in below]
            if len(top) != 1:
                return False
            if att.mode == attachment.FUSE:
                source = idshift.FSNAME if att.shift is not None else fuse2fs.FSNAME_PREFIX
                return (top[0].fstype.startswith("fuse") and top[0].source.startswith(source))
            device = att.loop
            if device is None:  # a device handed to attach_bind (the kernel NBD seam)
                device = next((m.source for m in mounts.mounts_at(mnt)), None)
            return device is not None and top[0].source == device

        return await trio.to_thread.run_sync(check)


def reconcile_all(run_dir: Path, journals: list[tuple[str, list[records.Entry]]], *,
                  keep: list[str] | None = None) -> dict[str, Any]:
    """Blocking, at start: tear down what a previous gatewayd left, except the attachments of
    the `keep` volumes (adopted)."""
    summary: dict[str, Any] = {"volumes": {}, "sweep": {}}
    for name, entries in journals:
        report = attachment.reconcile(run_dir, name, entries)
        summary["volumes"][name] = vars(report)
    sweep = attachment.sweep(run_dir, keep=keep or ())
    summary["sweep"] = vars(sweep)
    return summary
