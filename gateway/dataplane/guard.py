"""gatewayd's watch on the data-plane process (a supervised component).

The data plane serves every volume's block view; if its process dies (kill -9, a crash, the OOM
killer), every loop device and fuse2fs above its files fails each request with EIO or ENOTCONN
from then on. Its blast radius is every volume it served: the containers on them see I/O errors
on their root filesystems (bind mode: ext4 reports errors and may remount read-only; fuse mode:
fuse2fs fails). Nothing can bring those mounts back: the kernel's FUSE connection died with the
process.

So the guard, on the death it sees through a pidfd:
1. reports it: an error log line naming the pid and the volumes lost, `status.dataplane`
   (`deaths`, `last_death` with `lost` and `torn_down`), and a metric;
2. unmounts the dead block view (lazily: loop devices may still point into it) and starts a new
   data plane on the same run dir (the same control socket, so every manager's view works on);
3. marks each lost attachment `failed` and tears it down (forcibly: loop, kernel mount or
   fuse2fs), so `volume show` and `status` tell the truth and the volume can be mounted again;
4. closes the exports (and their standby loops) and reopens those the catalog remembers on the
   new data plane.

A `shutdown --all` stops the data plane on purpose: `expect_exit()` first, and it is not restarted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.attach.attachment import RunLayout
from gateway.dataplane import process as dataplane
from gateway.dataplane.view import RemoteView
from gateway.errors import BackendError, GatewayError
from gateway.host import mounts
from gateway.log import fields

if TYPE_CHECKING:
    from gateway.attach.manager import RootfsManager
    from gateway.export.manager import Exports

log = logging.getLogger("gateway.dataplane.guard")


class DataPlaneGuard:
    def __init__(self, view: RemoteView, run_dir: os.PathLike[str] | str, rootfs: RootfsManager,
                 exports: Exports, *, log_level: str = "INFO") -> None:
        self.view = view
        self.layout = RunLayout(Path(run_dir))
        self.rootfs = rootfs
        self.exports = exports
        self.log_level = log_level
        self.pid: int | None = None
        self.deaths = 0
        self.last_death: dict[str, Any] | None = None
        self._exit_expected = False
        self.on_death: list[Callable[[], None]] = []

    def expect_exit(self) -> None:
        """The data plane is being stopped on purpose (`shutdown --all`): do not restart it."""
        self._exit_expected = True

    def report(self) -> dict[str, Any]:
        return {"pid": self.pid, "deaths": self.deaths, "last_death": self.last_death}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                status = await self.view.status()
            except BackendError:
                if self._exit_expected:
                    break
                # It died while this component was being (re)started: recover first.
                await self._recover(self.pid, self.view.volumes())
                continue
            pid = int(status["pid"])
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # gone between the answer and here: the next status call tells
            self.pid = pid
            if not started:
                started = True
                task_status.started()
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
            if self._exit_expected:
                break
            await self._recover(pid, self.view.volumes())
        if not started:
            task_status.started()
        await trio.sleep_forever()  # stopped on purpose: nothing to watch until gatewayd ends

    async def _recover(self, pid: int | None, lost: list[str]) -> None:
        began = time.monotonic()
        attached = sorted(name for name in self.rootfs.active if name in lost)
        self.deaths += 1
        self.last_death = {"pid": pid, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "lost": lost, "torn_down": attached, "recovered_s": None}
        log.error("the data plane died: every volume it served lost its block view",
                  extra=fields(pid=pid, lost=lost, mounts_lost=attached))
        for hook in self.on_death:
            hook()
        await trio.to_thread.run_sync(self._drop_dead_view)
        await dataplane.ensure(self.layout.run_dir, log_level=self.log_level)
        await self.view.refresh()
        for name in attached:
            await self.rootfs.lose(name, "the data plane died")
        for name in list(self.exports.active):
            try:
                await self.exports.close(name, forget=False)
            except GatewayError as exc:
                log.error("closing an export of the dead data plane failed",
                          extra=fields(volume=name, error=exc.message))
        await self.exports.restore()
        self.last_death["recovered_s"] = round(time.monotonic() - began, 3)
        log.info("a new data plane serves; the lost mounts were torn down",
                 extra=fields(torn_down=attached, seconds=self.last_death["recovered_s"]))

    def _drop_dead_view(self) -> None:
        blk = self.layout.blk
        for _ in range(3):
            if not mounts.is_mountpoint(blk):
                return
            try:
                os.stat(blk)
                return  # it answers: not a dead view
            except OSError:
                pass
            try:
                mounts.umount(blk, lazy=True)
            except GatewayError as exc:
                log.warning("unmounting the dead block view failed",
                            extra=fields(path=str(blk), error=exc.message))
                return
