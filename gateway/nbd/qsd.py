"""The supervised qemu-storage-daemon (QSD) that exports volumes over NBD on a Unix socket.

    daemon = StorageDaemon(run_dir, desired=catalog.exported_specs)
    await nursery.start(daemon.run)
    uri = await daemon.export(spec)

One QSD per gateway. Its command line holds only the QMP monitor and the pidfile: every node and
export is added over QMP, with an explicit driver at every layer (see nodes.py), so nothing is
ever format-probed. What was sent is recorded for tests and audits: the newest command lines in
`argvs` and the newest QMP commands in `sent` (bounded: a long-running daemon keeps no history).

Restart: a death watcher waits on a pidfd; when QSD dies (or its QMP connection drops) a new QSD
is started at once, the NBD server restarted on the same socket path, and every export from
`desired()` plus every export made through `export()` is re-added. NBD clients see their
connection drop and reconnect.

Multi-conn: qemu 7.2 has no per-export multi-conn switch (it came in a later qemu). Its NBD
server advertises NBD_FLAG_CAN_MULTI_CONN on read-only exports iff the server's
max-connections is not 1, and never on writable ones. Read-only exports are trivially safe for
multi-conn. Writable exports would be safe as well (every connection to an export is served by
the same block node in the same process, so one connection's flush covers writes acknowledged
on any other), but 7.2 cannot say so; clients therefore use one connection for writable volumes.
We leave max-connections unlimited, which is what keeps multi-conn on for read-only exports.

Export teardown: block-export-del (mode safe: refused while clients are connected, unless
force=True), wait for BLOCK_EXPORT_DELETED, then blockdev-del of the nodes, top-down.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from gateway import command
from gateway.ceph import client as ceph_client
from gateway.ceph.client import ClientConfig
from gateway.ceph.leases import Leases
from gateway.errors import (
    BackendError,
    ClusterError,
    CommandError,
    Conflict,
    FormatError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from gateway.host import imagefile
from gateway.host.imagefile import FileId
from gateway.log import fields
from gateway.nbd.nodes import (
    DEFAULT_IO,
    ExportSpec,
    IOPolicy,
    export_args,
    layer_commands,
    node_names,
    teardown_order,
)
from gateway.nbd.qmp import Event, QMPError
from gateway.nbd.qmp_trio import QMPClient, Sent, sent_log

log = logging.getLogger("gateway.nbd.qsd")
QSD_BINARY = "qemu-storage-daemon"
START_TIMEOUT = 10.0
MAX_UNIX_PATH = 107
ARGV_LIMIT = 16  # command lines kept in `argvs`, newest last
STOP_GRACE = 3.0  # seconds after SIGTERM before SIGKILL
STABLE_SECONDS = 0.25  # a QSD that served this long before dying is restarted without backoff


class QSDError(BackendError):
    """qemu-storage-daemon could not be started or stopped."""


def _pin_chain(spec: ExportSpec, ceph: ClientConfig) -> dict[str, tuple[int, FileId]]:
    """O_PATH fds of every layer's file, checked (imagefile.open_pinned); an RBD layer has no
    file: its cluster must answer within `ceph`'s timeout instead, so that QSD (whose librbd
    waits minutes for a dead cluster, stalling every export) is never asked to open it in
    vain. Blocking."""
    pins: dict[str, tuple[int, FileId]] = {}
    try:
        for layer in spec.chain():
            if layer.rbd is not None:
                ceph_client.check_reachable(layer.rbd, ceph)
                continue
            pins[layer.name] = imagefile.open_pinned(layer.path, layer.file_id)
    except BaseException:
        for fd, _ in pins.values():
            os.close(fd)
        raise
    return pins


def _export_deleted(export_id: object, event: Event) -> bool:
    return event.name == "BLOCK_EXPORT_DELETED" and event.data.get("id") == export_id


def map_qmp_error(spec: ExportSpec, exc: QMPError) -> Exception:
    desc = exc.desc
    low = desc.lower()
    who = f"volume {spec.name}"
    if "lock" in low:
        return Conflict(f"{who}: {spec.path} is in use (qemu image lock): {desc}")
    if "no such file" in low:
        return NotFound(f"{who}: {spec.path} not found: {desc}")
    if "not in qcow2 format" in low or ("unsupported" in low and spec.fmt == "qcow2"):
        return FormatError(f"{who}: not a usable {spec.fmt} image: {desc}")
    return exc


class StorageDaemon:
    def __init__(self, run_dir: Path, desired: Callable[[], Iterable[ExportSpec]], *,
                 io: IOPolicy = DEFAULT_IO, binary: str = QSD_BINARY,
                 restart: bool = True) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.desired = desired
        self.io = io
        self.binary = binary
        self.restart = restart
        self.qmp_path = self.run_dir / "qsd.qmp"
        self.nbd_path = self.run_dir / "nbd.sock"
        self.pid_path = self.run_dir / "qsd.pid"
        self.log_path = self.run_dir / "qsd.log"
        for p in (self.qmp_path, self.nbd_path):
            if len(str(p).encode()) > MAX_UNIX_PATH:
                raise InvalidArgument(f"storage daemon: socket path too long: {p}")
        self.argv: list[str] = []
        self.argvs: collections.deque[list[str]] = collections.deque(maxlen=ARGV_LIMIT)
        self.sent: Sent = sent_log()
        self.events: collections.deque[Event] = collections.deque(maxlen=100)
        self.generation = 0
        self.restarts = 0
        self.last_restart_seconds: float | None = None
        self.failures: dict[str, str] = {}
        self._specs: dict[str, ExportSpec] = {}
        self._file_ids: dict[str, FileId] = {}  # the top layer's file of each export
        self.ceph = ClientConfig()  # how long an RBD volume's cluster may take to answer
        self.leases: Leases | None = None  # writer leases on RBD images (gatewayd's)
        self._lock = trio.Lock()
        self._ready = trio.Event()
        self._qmp: QMPClient | None = None
        self._proc: command.Child | None = None
        self._pid: int | None = None  # the QSD being supervised (our child, or adopted)
        # gatewayd sets this: QSD outlives the supervisor (its exports serve the data plane),
        # and the next gatewayd adopts it. False (the default, and `shutdown --all`): stopped
        # when the supervisor ends.
        self.keep_running = False
        self.adopted = 0  # generations that adopted a running QSD instead of starting one

    # ---- public API ----------------------------------------------------------------------------

    def uri(self, name: str) -> str:
        if name not in self._specs:
            raise NotFound(f"volume {name} is not exported")
        return f"nbd+unix:///{name}?socket={self.nbd_path}"

    def exported(self) -> set[str]:
        return set(self._specs)

    def spec(self, name: str) -> ExportSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(f"volume {name} is not exported") from None

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid if command.alive(self._proc) else None
        return self._pid if self._pid is not None and command.alive(self._pid) else None

    def health(self) -> dict[str, Any]:
        return {
            "ready": self._ready.is_set(),
            "pid": self.pid,
            "generation": self.generation,
            "adopted": self.adopted,
            "restarts": self.restarts,
            "last_restart_seconds": self.last_restart_seconds,
            "exports": sorted(self._specs),
            "failures": dict(self.failures),
            "socket": str(self.nbd_path),
        }

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> QMPClient:
        with trio.fail_after(timeout):
            while True:
                await self._ready.wait()
                if self._qmp is not None:
                    return self._qmp
                await trio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[QMPClient]:
        """The live QMP connection, with the export lock held (waits out a restart)."""
        while True:
            qmp = await self.wait_ready()
            async with self._lock:
                if self._qmp is qmp and self._ready.is_set():
                    yield qmp
                    return

    async def export(self, spec: ExportSpec) -> str:
        """Export a volume (idempotent for an identical spec); returns its NBD URI."""
        async with self._session() as qmp:
            current = self._specs.get(spec.name)
            if current is not None:
                if current != spec:
                    raise Conflict(f"volume {spec.name} is already exported as {current.fmt} "
                                   f"{'read-only' if current.read_only else 'writable'} "
                                   f"from {current.path}")
                return self.uri(spec.name)
            await self._add(qmp, spec)
            self._specs[spec.name] = spec
            self.failures.pop(spec.name, None)
            return self.uri(spec.name)

    async def unexport(self, name: str, *, missing_ok: bool = False, force: bool = False) -> None:
        """Remove an export and its nodes. force: drop connected clients (mode hard)."""
        if name not in self._specs:
            if missing_ok:
                return
            raise NotFound(f"volume {name} is not exported")
        async with self._session() as qmp:
            spec = self._specs.get(name)
            if spec is None:
                if missing_ok:
                    return
                raise NotFound(f"volume {name} is not exported")
            await self._remove(qmp, spec, force=force)
            del self._specs[name]
            self._file_ids.pop(name, None)

    def _check_sharing(self, spec: ExportSpec, file_id: FileId) -> None:
        """One file, one writer: qemu's image lock stops other processes, but inside one QSD
        every export shares all permissions, so two raw nodes on one file would both write."""
        for other in self._specs.values():
            if other.read_only and spec.read_only:
                continue
            if self._file_ids.get(other.name) == file_id:
                raise Conflict(f"volume {spec.name}: {spec.path} is in use by exported volume "
                               f"{other.name} ({'read-only' if other.read_only else 'writable'}); "
                               "a file can have one writer and no other user")

    # ---- QMP steps -----------------------------------------------------------------------------

    async def _add(self, qmp: QMPClient, spec: ExportSpec) -> None:
        """Add the export's nodes and the export. Every layer's file is opened first, in a
        worker thread, without following symlinks and checked against its registered identity;
        QSD gets /proc/<our pid>/fd/N, so it opens exactly the checked file."""
        pins = await trio.to_thread.run_sync(_pin_chain, spec, self.ceph)
        added: list[str] = []
        try:
            if spec.name in pins:
                self._check_sharing(spec, pins[spec.name][1])
            if spec.rbd is not None and not spec.read_only and self.leases is not None:
                await self.leases.take(spec.name, spec.rbd)  # one writer across hosts
            filenames = {name: imagefile.proc_path(fd) for name, (fd, _) in pins.items()}
            for cmd, args in layer_commands(spec, self.io, filenames=filenames):
                await qmp.execute(cmd, args)
                added.append(args["node-name"])
            await qmp.execute("block-export-add", export_args(spec))
        except QMPError as exc:
            for node in reversed(added):
                with contextlib.suppress(QMPError):
                    await qmp.execute("blockdev-del", {"node-name": node})
            raise map_qmp_error(spec, exc) from exc
        finally:
            for fd, _ in pins.values():
                os.close(fd)
        if spec.name in pins:
            self._file_ids[spec.name] = pins[spec.name][1]

    async def _remove(self, qmp: QMPClient, spec: ExportSpec, *, force: bool) -> None:
        export_id = node_names(spec).export_id
        watcher = qmp.watch(lambda ev: ev.name == "BLOCK_EXPORT_DELETED"
                            and ev.data.get("id") == export_id)
        try:
            try:
                await qmp.execute("block-export-del",
                                  {"id": export_id, "mode": "hard" if force else "safe"})
            except QMPError as exc:
                if "not found" in exc.desc.lower():
                    watcher = None  # type: ignore[assignment]
                elif "in use" in exc.desc.lower() or "connection" in exc.desc.lower():
                    raise Conflict(f"volume {spec.name}: NBD clients still connected: "
                                   f"{exc.desc}") from exc
                else:
                    raise
            if watcher is not None:
                with trio.fail_after(10):
                    await watcher.wait()
        finally:
            if watcher is not None:
                qmp.unwatch(watcher)
        for node in teardown_order(spec):
            try:
                await qmp.execute("blockdev-del", {"node-name": node})
            except QMPError as exc:
                if "not found" not in exc.desc.lower() and "cannot find" not in exc.desc.lower():
                    raise

    # ---- supervision ---------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        return [self.binary,
                "--chardev", f"socket,id=gwqmp,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=gwqmp,mode=control",
                "--pidfile", str(self.pid_path)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.keep_running:
            await self._kill_stale()
        started = False
        backoff = 0.0
        died_at: float | None = None
        try:
            while True:
                ready_at: float | None = None
                try:
                    async with self._generation() as lost:
                        ready_at = trio.current_time()
                        if died_at is not None:
                            self.last_restart_seconds = ready_at - died_at
                        if not started:
                            started = True
                            task_status.started()
                        await lost.wait()
                except QSDError:
                    if not started:
                        raise
                if not self.restart:
                    raise QSDError("qemu-storage-daemon exited: "
                                   + command.stderr_tail(self.log_path))
                died_at = trio.current_time()
                self.restarts += 1
                # A crash loop (dying before ready, or within STABLE_SECONDS of it) backs off,
                # doubling to 5 s; a QSD that served is restarted at once, however often it is
                # killed (the restart is a stall inside every container).
                served = ready_at is not None and died_at - ready_at > STABLE_SECONDS
                backoff = 0.0 if served else min(max(backoff * 2, 0.05), 5.0)
                if backoff:
                    await trio.sleep(backoff)
        finally:
            self._ready = trio.Event()
            self._qmp = None

    def _running_pid(self) -> int | None:
        """The QSD a previous supervisor left serving this run dir (its pidfile, its QMP socket
        on the command line), if it still runs."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if b"qemu-storage-daemon" in cmdline and str(self.qmp_path).encode() in cmdline:
            return pid if command.alive(pid) else None
        return None

    def _spawn(self) -> command.Child:
        for p in (self.qmp_path, self.nbd_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        argv = self._argv()
        self.argv = argv
        self.argvs.append(argv)
        try:
            return command.spawn(argv, stderr_path=str(self.log_path))
        except CommandError as exc:
            raise QSDError(exc.message) from exc

    @contextlib.asynccontextmanager
    async def _generation(self) -> AsyncIterator[trio.Event]:
        """One QSD's life under this supervisor: a new one, or (keep_running) the one a
        previous gatewayd left, adopted through its QMP socket with its exports as they are."""
        found = self._running_pid() if self.keep_running else None
        proc: command.Child | None = None
        if found is None:
            proc = self._spawn()
            pid = proc.pid
        else:
            pid = found
            self.adopted += 1
            log.info("adopting the running qemu-storage-daemon", extra=fields(pid=pid))
        self._proc, self._pid = proc, pid
        self.generation += 1
        pidfd = os.pidfd_open(pid)
        lost = trio.Event()
        try:
            async with trio.open_nursery() as nursery:

                async def watch_death() -> None:
                    await trio.lowlevel.wait_readable(pidfd)
                    lost.set()

                nursery.start_soon(watch_death)
                if proc is not None:
                    await self._wait_socket(proc)
                async with QMPClient.connect(str(self.qmp_path), sent=self.sent,
                                             on_event=self.events.append,
                                             name="qemu-storage-daemon",
                                             retry_for=START_TIMEOUT) as qmp:

                    async def watch_qmp() -> None:
                        await qmp.closed.wait()
                        lost.set()

                    nursery.start_soon(watch_qmp)
                    if proc is not None:
                        # max-connections: QSD's default is 100, and every volume has two
                        # connections (the data plane's and gatewayd's): 0 lifts the limit.
                        await qmp.execute("nbd-server-start", {
                            "addr": {"type": "unix", "data": {"path": str(self.nbd_path)}},
                            "max-connections": 0})
                    # root only, whatever umask QSD was started with (NBD has no peer check)
                    for sock in (self.nbd_path, self.qmp_path):
                        os.chmod(sock, 0o600)
                    async with self._lock:
                        if proc is not None:
                            await self._readd(qmp)
                        else:
                            await self._resync(qmp)
                        self._qmp = qmp
                        self._ready.set()
                    try:
                        yield lost
                    finally:
                        self._ready = trio.Event()
                        self._qmp = None
                nursery.cancel_scope.cancel()
        except BackendError as exc:
            if isinstance(exc, QSDError):
                raise
            raise QSDError(f"qemu-storage-daemon: {exc.message}") from exc
        finally:
            if lost.is_set() or not self.keep_running:
                with trio.CancelScope(shield=True):
                    await self._stop(proc if proc is not None else pid, pidfd)
            else:  # the supervisor ends, QSD goes on serving: the next gatewayd adopts it
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
                self._proc = self._pid = None

    async def _resync(self, qmp: QMPClient) -> None:
        """An adopted QSD: keep the exports it serves that are still wanted (their nodes are
        named after the volume, so the same spec has the same nodes), add the missing ones,
        remove the rest with their nodes."""
        serving = {str(e.get("id")) for e in await qmp.execute("query-block-exports")
                   if isinstance(e, dict)}
        unwanted = await self._readd(qmp, serving)
        for export_id in unwanted:
            log.warning("removing an export nobody wants", extra=fields(id=export_id))
            gone = qmp.watch(functools.partial(_export_deleted, export_id))
            try:
                await qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
                with trio.move_on_after(10):
                    await gone.wait()
            except QMPError as exc:
                log.warning("removing an export failed", extra=fields(id=export_id,
                                                                      error=exc.desc))
            finally:
                qmp.unwatch(gone)
        await self._delete_unwanted_nodes(qmp)

    async def _delete_unwanted_nodes(self, qmp: QMPClient) -> None:
        """Nodes of ours (gw*/gb*/gt* names) that no wanted export uses: what an export left
        when it went away with its gatewayd. Deleted top-down, as far as they let go."""
        keep = {n for spec in self._specs.values() for n in teardown_order(spec)}
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        left = [n.get("node-name") for n in nodes if isinstance(n, dict)]
        left = [n for n in left if isinstance(n, str) and n[:2] in ("gw", "gb", "gt")
                and n not in keep]
        while left:
            deleted = []
            for node in left:
                try:
                    await qmp.execute("blockdev-del", {"node-name": node})
                    deleted.append(node)
                except QMPError:
                    continue  # still used by a node above it: next round
            if not deleted:
                log.warning("nodes left in qemu-storage-daemon", extra=fields(nodes=left))
                return
            left = [n for n in left if n not in deleted]

    async def _readd(self, qmp: QMPClient, serving: set[str] | None = None) -> set[str]:
        """Serve every wanted export again; one already `serving` (an adopted QSD's, by export
        id) is kept as it is. Returns the ids served that nobody wants any more."""
        left = set(serving or ())
        wanted = dict(self._specs)
        for spec in self.desired():
            wanted[spec.name] = spec
        self._specs.clear()
        self._file_ids.clear()
        for spec in wanted.values():
            export_id = node_names(spec).export_id
            try:
                if export_id in left:
                    left.discard(export_id)
                    # still the registered file? (checked as for a new export)
                    pins = await trio.to_thread.run_sync(_pin_chain, spec, self.ceph)
                    for fd, _ in pins.values():
                        os.close(fd)
                    if spec.name in pins:
                        self._file_ids[spec.name] = pins[spec.name][1]
                else:
                    await self._add(qmp, spec)
            except (QMPError, Conflict, NotFound, FormatError, PermissionDenied, ClusterError,
                    InvalidArgument) as exc:
                self.failures[spec.name] = str(exc)
                if serving is not None and export_id in serving:
                    left.add(export_id)  # served, but no longer the registered file: it goes
                continue
            self._specs[spec.name] = spec
        return left

    async def _wait_socket(self, proc: command.Child) -> None:
        with trio.move_on_after(START_TIMEOUT):
            while not self.qmp_path.exists():
                if not command.alive(proc):
                    raise QSDError("qemu-storage-daemon exited at start: "
                                   + command.stderr_tail(self.log_path))
                await trio.sleep(0.002)
            return
        raise QSDError(f"qemu-storage-daemon: no QMP socket after {START_TIMEOUT:g}s")

    async def _stop(self, proc: command.Child | int, pidfd: int) -> None:
        try:
            ended = await command.stop_async(proc, grace=STOP_GRACE, kill_wait=5.0, pidfd=pidfd)
            if ended is command.Ended.STUCK:
                log.error("qemu-storage-daemon would not die",
                          extra=fields(pid=proc if isinstance(proc, int) else proc.pid,
                                       generation=self.generation))
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
            self._proc = self._pid = None

    async def _kill_stale(self) -> None:
        """Kill a QSD left behind by a crashed gatewayd (its pidfile names our run dir's socket)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        pidfd = command.open_pidfd(pid) if pid > 0 else None
        if pidfd is not None:
            try:
                # checked after the pidfd is open, so the signal reaches the process checked
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    cmdline = b""
                if b"qemu-storage-daemon" in cmdline and str(self.qmp_path).encode() in cmdline:
                    ended = await command.stop_async(pid, grace=0, kill_wait=5.0, pidfd=pidfd)
                    if ended is command.Ended.STUCK:
                        raise QSDError(f"stale qemu-storage-daemon {pid} did not die")
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
        for p in (self.qmp_path, self.nbd_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
