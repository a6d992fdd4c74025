"""Snapshots and saved images of volumes, live: a point-in-time copy made inside QSD.

`take(...)` copies a volume as it is at one instant into a new image file, while a container may
go on writing to it:

1. the volume is exported (if it is not already), so the copy reads the very node the container
   writes through;
2. the point in time: bind mode freezes the kernel filesystem (FIFREEZE on RUN_DIR/mnt/VOL, in a
   worker thread), then starts the backup job and thaws at once, whatever happens (the freeze
   lasts tens of milliseconds, mostly FIFREEZE's own writeback, and its length is reported;
   the job is held back until the thaw is done, see run_backup's `hold`). It is bounded: if
   QSD has not started the job FREEZE_LIMIT seconds after the freeze, the filesystem is thawed
   anyway and the copy is only crash-consistent. Fuse mode cannot freeze fuse2fs, so what can
   be flushed is flushed (syncfs on the fuse2fs mount pushes the kernel's dirty pages to
   fuse2fs, then the export's NBD flush) and the copy is crash-consistent, as is a bind mount
   whose host view was released (nothing left on the host to freeze); an unmounted volume
   needs nothing;
3. QSD's backup job copies the rest in the background (copy-before-write keeps the instant),
   reporting progress; a cancel stops it.

The volume's lock is held for the whole copy: its export must not go away under the job, so a
umount, mount or removal of that volume waits for the copy (the container's I/O does not).
Input and output formats are explicit on every node (gateway.nbd.backup); the target image is
created by the caller with an explicit format and its file is the caller's to remove on failure.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.errors import BackendError
from gateway.host import freeze
from gateway.log import fields
from gateway.nbd.backup import BackupTarget, run_backup
from gateway.nbd.nodes import node_names

if TYPE_CHECKING:
    from gateway.export.manager import Exports

log = logging.getLogger("gateway.volumes.snapshot")
FROZEN = "frozen"  # bind mode: filesystem frozen for the instant
CRASH_CONSISTENT = "crash-consistent"  # fuse mode (or a released host view): as after a power cut
UNMOUNTED = "unmounted"  # nothing was writing
FREEZE_LIMIT = 5.0  # seconds a filesystem may stay frozen, whatever QSD does
SYNCFS_LIMIT = 30.0  # seconds to wait for a fuse2fs mount's syncfs


@dataclass(frozen=True)
class Taken:
    """What a point-in-time copy was: its consistency and how long the freeze lasted."""

    at: float  # wall-clock time of the instant
    consistency: str
    freeze_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
                "consistency": self.consistency,
                "freeze_ms": None if self.freeze_seconds is None
                else round(self.freeze_seconds * 1000, 3)}


class Instant:
    """The point in time: the freeze (bind mode) and its release, which runs once, from
    whichever comes first: the job started, the freeze limit passed, or an error."""

    def __init__(self, kernel_mount: Path | None,
                 on_freeze: Callable[[float], None] | None) -> None:
        self.kernel_mount = kernel_mount
        self.on_freeze = on_freeze
        self.frozen: freeze.Frozen | None = None
        self.began = 0.0  # perf_counter when FIFREEZE was called
        self.phases: dict[str, float] = {}  # seconds: the FIFREEZE call, the job's start
        self.held: float | None = None  # seconds from FIFREEZE to FITHAW
        self.at: float | None = None  # wall clock of the instant (the job started)
        self.by_limit = False  # thawed by FREEZE_LIMIT before the job started
        self._lock = trio.Lock()

    async def freeze(self) -> None:
        if self.kernel_mount is None:
            return
        # Written back before the freeze, while writers still run: FIFREEZE then has less to
        # write while they wait.
        await trio.to_thread.run_sync(_syncfs, self.kernel_mount)
        self.began = time.perf_counter()
        # Shielded: a freeze that happened is always known, so that it is always thawed.
        with trio.CancelScope(shield=True):
            self.frozen = await trio.to_thread.run_sync(freeze.freeze, self.kernel_mount)
        self.phases["fifreeze"] = time.perf_counter() - self.began

    async def started(self) -> None:
        """run_backup's on_started: the point in time is fixed (or the job failed to start)."""
        if self.at is None:
            self.at = time.time()
            if self.frozen is not None:
                self.phases["job_start"] = (time.perf_counter() - self.began
                                            - self.phases["fifreeze"])
        await self.thaw()

    async def thaw(self, *, by_limit: bool = False) -> None:
        async with self._lock:
            frozen, self.frozen = self.frozen, None
            if frozen is None:
                return
            asked = time.perf_counter()
            try:
                await trio.to_thread.run_sync(frozen.thaw)
            finally:
                self.held = time.perf_counter() - self.began
                self.phases["fithaw"] = time.perf_counter() - asked
                self.by_limit = by_limit and self.at is None
                if self.by_limit:
                    log.warning("freeze limit reached before the backup started; thawed",
                                extra=fields(path=str(self.kernel_mount),
                                             seconds=round(self.held, 3)))
                log.info("filesystem frozen for a point-in-time copy", extra=fields(
                    path=str(self.kernel_mount), seconds=round(self.held, 6),
                    **{k: round(v, 6) for k, v in self.phases.items()}))
                if self.on_freeze is not None:
                    self.on_freeze(self.held)

    async def bound(self) -> None:
        await trio.sleep(FREEZE_LIMIT)
        await self.thaw(by_limit=True)  # the guest must not wait longer, whatever QSD does


def _syncfs(path: Path) -> None:
    """syncfs(2) on the filesystem mounted at `path` (blocking; Python has no os.syncfs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


async def flush_fuse(path: Path) -> None:
    """Push the kernel's dirty pages of a fuse2fs mount to fuse2fs (bounded wait; the thread is
    left to finish if fuse2fs hangs)."""
    with trio.move_on_after(SYNCFS_LIMIT):
        try:
            await trio.to_thread.run_sync(_syncfs, path, abandon_on_cancel=True)
        except OSError as exc:
            raise BackendError(f"syncfs {path}: {exc.strerror}") from exc


async def take(exports: Exports, name: str, target: BackupTarget, *, mounted: str | None,
               kernel_mount: Path | None, fuse_mount: Path | None = None,
               progress: Callable[[float], None] | None = None,
               cancel: trio.Event | None = None,
               on_freeze: Callable[[float], None] | None = None) -> Taken:
    """Copy volume `name` now into `target`. Caller holds the volume lock. `mounted` is the
    attachment's mode (None: not mounted); `kernel_mount` the bind mode's RUN_DIR/mnt/VOL when it
    is there to freeze; `fuse_mount` the fuse mode's RUN_DIR/rootfs/VOL when it is there to
    sync. Raises Cancelled when `cancel` is set before the copy ends."""
    made_export = not exports.in_use(name)
    export = await exports.open(name)
    try:
        source = node_names(exports.qsd.spec(name)).fmt
        qmp = await exports.qsd.wait_ready()
        if mounted == "fuse" and fuse_mount is not None:
            await flush_fuse(fuse_mount)
        if mounted is not None:
            # what a guest flush would push: every write the block view accepted reaches QSD
            await export.backend.flush()
        instant = Instant(kernel_mount if mounted == "bind" else None, on_freeze)
        try:
            await instant.freeze()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(instant.bound)
                await run_backup(qmp, source, target, on_started=instant.started,
                                 progress=progress, cancel=cancel,
                                 hold=instant.frozen is not None)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await instant.thaw()  # always, also on error or cancel
        if mounted is None:
            consistency = UNMOUNTED
        elif kernel_mount is not None and mounted == "bind" and not instant.by_limit:
            consistency = FROZEN
        else:
            consistency = CRASH_CONSISTENT
        assert instant.at is not None
        return Taken(instant.at, consistency, instant.held)
    finally:
        if made_export:
            with trio.CancelScope(shield=True):
                await exports.close(name)

