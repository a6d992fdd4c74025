"""The data plane: the block view and its NBD connections, in a process of their own.

Everything a running container's I/O goes through is outside gatewayd: loop devices and kernel
mounts (the kernel's), fuse2fs (its own processes), qemu-storage-daemon (its own process), and the
block view with its NBD clients, here. gatewayd (the control plane) may stop, crash or be
replaced; this process goes on serving RUN_DIR/blk, and a new gatewayd finds it through its
control socket RUN_DIR/dataplane.sock and adopts what it serves.

Control ops (the admin protocol's JSON lines, root only):
  status                        pid, and every plugged volume: export, size, mode, window, writes,
                                open files, connected
  plug {name, socket, export}   connect to an NBD export and show NAME/disk in the block view
  unplug {name, force}          remove NAME (refused while its files are open, unless force)
  set-window {name, start, size} / close-window {name}
  flush {name}                  NBD flush of NAME
  stop {force}                  end the process (refused while volumes are plugged, unless force)

A connection that drops (QSD restarted) is reconnected on the next request, retried until the
NBD socket answers again or RECONNECT_TIMEOUT passes: the loop device above sees a stall.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gateway.admin.protocol import Request
from gateway.admin.server import AccessPolicy, AdminServer, Peer
from gateway.errors import BackendError, Conflict, InvalidArgument, NotFound
from gateway.export.backend import VolumeBackend
from gateway.fuse.blockview import BlockView
from gateway.log import fields
from gateway.nbd.client import NBDClient

log = logging.getLogger("gateway.dataplane")
SOCKET_NAME = "dataplane.sock"
PIDFILE_NAME = "dataplane.pid"
RECONNECT_TIMEOUT = 15.0


class _SocketReady:
    """What a VolumeBackend waits on before reconnecting: here, the NBD socket accepting."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def wait_ready(self, timeout: float = RECONNECT_TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    sock = await trio.open_unix_socket(self.path)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await sock.aclose()
                return


@dataclass
class Plugged:
    name: str
    socket: str
    export: str
    backend: VolumeBackend


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{key} must be a non-empty string")
    return value


def _int(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{key} must be a non-negative integer")
    return value


class DataPlane:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.view = BlockView()
        self.plugged: dict[str, Plugged] = {}
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._locks: dict[str, trio.Lock] = {}

    @property
    def socket_path(self) -> Path:
        return self.run_dir / SOCKET_NAME

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop`: then every volume is unplugged (forcibly) and the view unmounted.
        SIGTERM and SIGINT end it only while nothing is plugged: a package upgrade's stop of the
        control plane must never take containers' disks away."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.view.run, self.run_dir / "blk")
                server = AdminServer(self.socket_path, self.handle, AccessPolicy(None))
                await nursery.start(server.run)
                nursery.start_soon(self._signals, signals)
                task_status.started()
                await self._stop.wait()
                for name in list(self.plugged):
                    await self._unplug(name, force=True)
                nursery.cancel_scope.cancel()

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            if not self.plugged:
                self._stop.set()
                return
            log.warning("signal ignored while volumes are plugged",
                        extra=fields(signal=signal.Signals(signum).name,
                                     volumes=sorted(self.plugged)))

    def _lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    async def handle(self, request: Request, peer: Peer) -> Any:
        args = request.args
        if request.op == "status":
            return self.status()
        if request.op == "stop":
            if self.plugged and args.get("force") is not True:
                raise Conflict(f"data plane still serves {', '.join(sorted(self.plugged))}")
            self._stop.set()
            return {"stopping": True}
        name = _str(args, "name")
        async with self._lock(name):
            if request.op == "plug":
                return await self._plug(name, _str(args, "socket"), _str(args, "export"))
            if request.op == "unplug":
                await self._unplug(name, force=args.get("force") is True)
                return {"name": name, "plugged": False}
            plugged = self._get(name)
            if request.op == "set-window":
                self.view.set_window(name, _int(args, "start"), _int(args, "size"))
            elif request.op == "close-window":
                await self.view.close_window(name)
            elif request.op == "flush":
                await plugged.backend.flush()
            else:
                raise InvalidArgument(f"unknown op {request.op!r}")
            return self.volume_status(name)

    def _get(self, name: str) -> Plugged:
        plugged = self.plugged.get(name)
        if plugged is None:
            raise NotFound(f"data plane: volume {name} is not plugged")
        return plugged

    async def _plug(self, name: str, socket: str, export: str) -> dict[str, Any]:
        current = self.plugged.get(name)
        if current is not None:
            if (current.socket, current.export) != (socket, export):
                raise Conflict(f"data plane: volume {name} is plugged to another export")
            return self.volume_status(name)
        assert self._nursery is not None
        client = await NBDClient.connect(socket, export, nursery=self._nursery)
        try:
            backend = VolumeBackend(client, _SocketReady(socket))
            self.view.add_volume(name, backend)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        self.plugged[name] = Plugged(name, socket, export, backend)
        log.info("volume plugged", extra=fields(volume=name, export=export))
        return self.volume_status(name)

    async def _unplug(self, name: str, *, force: bool) -> None:
        plugged = self.plugged.get(name)
        if plugged is None:
            return
        await self.view.remove_volume(name, force=force)
        del self.plugged[name]
        try:
            await plugged.backend.flush()
        except BackendError as exc:
            log.warning("flush at unplug failed", extra=fields(volume=name, error=exc.message))
        finally:
            await plugged.backend.client.aclose()
        log.info("volume unplugged", extra=fields(volume=name))

    def volume_status(self, name: str) -> dict[str, Any]:
        plugged = self._get(name)
        window = self.view.window(name) if name in self.view.volumes() else None
        return {"name": name, "socket": plugged.socket, "export": plugged.export,
                "size": plugged.backend.size, "read_only": plugged.backend.read_only,
                "window": list(window) if window is not None else None,
                "writes": plugged.backend.writes, "open": self.view.open_count(name),
                "connected": plugged.backend.client.connected}

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(),
                "volumes": {name: self.volume_status(name) for name in sorted(self.plugged)}}


async def serve(run_dir: Path) -> None:
    plane = DataPlane(run_dir)
    pidfile = run_dir / PIDFILE_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(plane.run)
        pidfile.write_text(f"{os.getpid()}\n")
        log.info("data plane ready", extra=fields(socket=str(plane.socket_path)))
    try:
        pidfile.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    log.info("data plane stopped")
