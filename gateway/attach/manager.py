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
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.attach import attachment
from gateway.catalog import Catalog, JournalStep
from gateway.errors import GatewayError, InvalidArgument, ProbeError
from gateway.log import fields
from gateway.probe.core import probe_reader_async

if TYPE_CHECKING:
    from gateway.export.manager import Exports
    from gateway.fuse.blockview import BlockView

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


def made_own_export(steps: Any) -> bool:
    """Whether the journalled mount exported its volume itself (and so must unexport it)."""
    return any(step == "export" and detail.get("auto") for step, detail in steps)


class RootfsManager:
    def __init__(self, run_dir: Path, catalog: Catalog, exports: Exports, view: BlockView,
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

    def attachment_of(self, name: str) -> dict[str, Any] | None:
        record = self.catalog.attachment(name)
        return None if record is None else record.to_json()

    def _journal(self, name: str, token: trio.lowlevel.TrioToken,
                 pending: list[JournalStep]) -> attachment.Journal:
        """The attach steps' journal: a step about to start is written at once, together with
        the results of the steps before it; results after the last start stay in `pending`."""
        def write(step: str, detail: dict[str, object]) -> None:
            pending.append((step, dict(detail)))
            if detail.get("phase") != "done":
                # Called from the worker thread: the catalog lives on the trio thread.
                steps = pending[:]
                pending.clear()
                trio.from_thread.run_sync(self.catalog.journal_steps, name, steps,
                                          trio_token=token)
        return write

    async def mount(self, name: str, mode: str) -> dict[str, Any]:
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}: choose bind or fuse")
        async with self.locks(name):
            volume = self.catalog.volume(name)
            record = self.catalog.attachment(name)
            rootfs = str(self.layout.rootfs(name))
            if record is not None and record.state == "mounted":
                if await self._still_mounted(name, record.mode, record.steps):
                    if record.mode != mode:
                        raise InvalidArgument(f"volume {name} is already mounted in "
                                              f"{record.mode} mode; umount it first")
                    return {"name": name, "rootfs": record.rootfs, "mode": record.mode}
                # Unmounted behind our back (or never ours): never hand out an empty directory.
                log.warning("a mounted volume's rootfs is gone; mounting it afresh",
                            extra=fields(volume=name, mode=record.mode, rootfs=rootfs))
                await self._teardown(name, force=True)
                record = None
            if record is not None:
                await self._teardown(name, force=False)
            if mode == "fuse" and volume.fstype and volume.fstype not in FUSE_FSTYPES:
                raise InvalidArgument(f"fuse mode serves ext2/3/4 only; volume {name} holds "
                                      f"{volume.fstype}")
            phases: dict[str, float] = {}
            auto_export = not self.exports.in_use(name)
            self.catalog.begin_attachment(name, mode, rootfs, [("export", {"auto": auto_export})])
            standby: _Standby | None = None
            try:
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
                    self.view.set_window(name, *window)
                self.catalog.set_attachment(name, window=window)
                phases["window"] = time.perf_counter() - t

                # The standby's cached blocks are only as fresh as the disk: any write since the
                # umount (the disk file, another window) and they are dropped.
                cached = standby is not None and standby.writes == export.backend.writes
                done: list[JournalStep] = []  # journal entries still to write
                att = await self._attach(name, mode, fstype, volume.read_only, volume.nosuid,
                                         volume.noexec, phases,
                                         standby.loop if standby is not None else None, cached,
                                         done)
                self.active[name] = att
                self.catalog.set_attachment(name, state="mounted", steps=done)
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
        log.info("rootfs mounted", extra=fields(volume=name, mode=mode, fstype=fstype,
                                                rootfs=rootfs, phases=Phases(phases).to_json()))
        return {"name": name, "rootfs": rootfs, "mode": mode}

    async def _attach(self, name: str, mode: str, fstype: str, read_only: bool, nosuid: bool,
                      noexec: bool, phases: dict[str, float],
                      standby: attachment.StandbyLoop | None, standby_cache: bool,
                      pending: list[JournalStep]) -> attachment.Attachment:
        journal = self._journal(name, trio.lowlevel.current_trio_token(), pending)
        started: dict[str, float] = {}

        def timed(step: str, detail: dict[str, object]) -> None:
            now = time.perf_counter()
            if detail.get("phase") == "start":
                started[step] = now
            elif step in started:
                phases[step] = now - started.pop(step)
            journal(step, detail)

        force_fsck = self.catalog.fsck_needed(name)

        def work() -> attachment.Attachment:
            if mode == "bind":
                return attachment.attach_bind(self.run_dir, name, fstype, journal=timed,
                                              read_only=read_only, nosuid=nosuid, noexec=noexec,
                                              standby=standby, standby_cache=standby_cache)
            return attachment.attach_fuse(
                self.run_dir, name, fstype, journal=timed, read_only=read_only, nosuid=nosuid,
                noexec=noexec, stderr_path=str(self.run_dir / f"fuse2fs-{name}.log"),
                force_fsck=force_fsck)
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
            self.catalog.end_attachment(name)

    async def umount(self, name: str, *, force: bool = False) -> dict[str, Any]:
        async with self.locks(name):
            self.catalog.volume(name)
            if self.catalog.attachment(name) is None:
                return {"name": name, "mounted": False}
            await self._teardown(name, force=force)
        log.info("rootfs unmounted", extra=fields(volume=name, force=force))
        return {"name": name, "mounted": False}

    async def _teardown(self, name: str, *, force: bool) -> None:
        record = self.catalog.attachment(name)
        auto = record is not None and made_own_export(record.steps)
        att = self.active.pop(name, None)
        standby: _Standby | None = None
        if att is not None:
            keep = auto and self.exports.lingers and att.mode == attachment.BIND
            try:
                loop = await trio.to_thread.run_sync(
                    lambda: attachment.detach(att, force=force, keep_loop=keep))
            except BaseException:
                self.active[name] = att
                raise
            window = self.view.window(name) if name in self.view.volumes() else None
            export = self.exports.active.get(name)
            if loop is not None and window is not None and export is not None:
                standby = _Standby(loop, window, export.backend.writes)
            elif loop is not None:
                await trio.to_thread.run_sync(loop.close)
        elif record is not None:
            steps = record.steps
            report = await trio.to_thread.run_sync(
                lambda: attachment.reconcile(self.run_dir, name, steps))
            if report.remaining:
                raise attachment.TeardownIncomplete(name, report.remaining)
        try:
            if name in self.view.volumes():
                if standby is None:
                    await self.view.close_window(name)
                export = self.exports.active.get(name)
                if export is not None:
                    await export.backend.flush()
        except BaseException:
            if standby is not None:
                with trio.CancelScope(shield=True):
                    await standby.close()
            raise
        if auto:
            await self.exports.release(name, standby)
        elif standby is not None:
            await standby.close()
        self.catalog.end_attachment(name)

    def _watch_fuse2fs(self, name: str, att: attachment.Attachment) -> None:
        """Notice a fuse2fs that dies on its own, and tear down what is left of its mount."""
        pid = att.fuse2fs_pid
        if pid is None:
            return
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
            log.error("fuse2fs exited on its own; tearing the mount down",
                      extra=fields(volume=name, pid=pid))
            self.catalog.set_attachment(name, state="failed")
            self.catalog.set_fsck_needed(name, True)
            try:
                await self.umount(name, force=True)
            except GatewayError as exc:
                log.error("teardown after fuse2fs exit failed",
                          extra=fields(volume=name, error=exc.message))

        self.nursery.start_soon(watch)

    async def release_host_view(self, name: str) -> None:
        """nova's clean_lxc_namespace: drop the host's bind at RUN_DIR/rootfs/VOL once the
        container runs, and the private kernel mount at RUN_DIR/mnt/VOL behind it; the container
        keeps its own copy of the mount, and with it the filesystem."""
        from gateway.libvirt.hostview import release_host_view
        async with self.locks(name):
            paths = (self.layout.rootfs(name), self.layout.mnt(name))
            released = await trio.to_thread.run_sync(
                lambda: [release_host_view(p) for p in paths])
            self.catalog.journal(name, "host-view-released", {
                "paths": [str(p) for p in paths], "released": released})

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

    async def _still_mounted(self, name: str, mode: str, steps: tuple[JournalStep, ...]) -> bool:
        """Whether a "mounted" record still holds: RUN_DIR/rootfs/NAME is, on top, the mount
        this gatewayd made there (fuse: a fuse2fs mount while our handle's process lives; bind:
        a mount of the attachment's loop device). Once the host view was released (a running
        container keeps its own copy) only the backend is checked: our fuse2fs lives, or the
        loop device still serves the volume's window. Reads mountinfo in a worker thread."""
        from gateway.host import fuse2fs, loopdev, mounts
        att = self.active.get(name)
        if att is None or att.mode != mode:
            return False
        released = False
        for step, detail in steps:
            if step == "host-view-released":
                flag = detail.get("released")
                released = any(flag) if isinstance(flag, list) else bool(flag)
        target, mnt = self.layout.rootfs(name), self.layout.mnt(name)
        window = str(self.layout.window(name))

        def check() -> bool:
            if att.mode == attachment.FUSE:
                if att.fuse is None or not att.fuse.alive():
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
                return (top[0].fstype.startswith("fuse")
                        and top[0].source.startswith(fuse2fs.FSNAME_PREFIX))
            device = att.loop
            if device is None:  # a device handed to attach_bind (the kernel NBD seam)
                device = next((m.source for m in mounts.mounts_at(mnt)), None)
            return device is not None and top[0].source == device

        return await trio.to_thread.run_sync(check)


def reconcile_all(run_dir: Path, journals: list[tuple[str, Any]]) -> dict[str, Any]:
    """Blocking, before the block view is mounted: tear down what a crashed gatewayd left."""
    summary: dict[str, Any] = {"volumes": {}, "sweep": {}}
    for name, steps in journals:
        report = attachment.reconcile(run_dir, name, steps)
        summary["volumes"][name] = vars(report)
    sweep = attachment.sweep(run_dir)
    summary["sweep"] = vars(sweep)
    return summary
