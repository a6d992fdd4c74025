"""gatewayd: the trio service behind the admin socket."""

from __future__ import annotations

import argparse
import fcntl
import functools
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import trio

from gateway import log as gwlog
from gateway.admin.gateway import Components, Gateway
from gateway.admin.ops import Dispatcher
from gateway.admin.server import AccessPolicy, AdminServer
from gateway.attach import journal
from gateway.attach.attachment import (
    Attachment,
    RunLayout,
    adoptable,
    prepare_rootfs_root,
    private_dir,
)
from gateway.attach.manager import RootfsManager, reconcile_all
from gateway.attach.states import SERVING, AttachmentEvent, AttachmentState, transition
from gateway.catalog import Catalog, Volume
from gateway.ceph.fencing import Fencer
from gateway.ceph.location import is_rbd_path
from gateway.config import (
    DEFAULT_LEASE_SECONDS,
    MIN_LEASE_SECONDS,
    Settings,
    ceph_seconds,
    check_linger,
    host_id,
    parse_roots,
    userns_range,
)
from gateway.daemon.metrics import Metrics
from gateway.dataplane import process as dataplane
from gateway.dataplane.guard import DataPlaneGuard
from gateway.dataplane.view import RemoteView
from gateway.errors import Conflict, GatewayError, first_gateway_error
from gateway.export.manager import Exports
from gateway.host import imagefile
from gateway.host.imagefile import FileId
from gateway.libvirt.watcher import watch_domains
from gateway.log import fields
from gateway.nbd.qsd import StorageDaemon

log = logging.getLogger("gateway.daemon.main")
STOP_ANSWER_DELAY = 0.2  # seconds left to answer `shutdown` before the admin socket closes


def notify_systemd(message: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed", extra=fields(error=str(exc)))


def lock_run_dir(run_dir: Path) -> int:
    """One gatewayd per run dir: an flock held for the daemon's lifetime (released on exit,
    however it exits). Taken before anything touches the run dir."""
    private_dir(run_dir, 0o711)
    fd = os.open(run_dir / "gatewayd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Conflict(f"another gatewayd is serving {run_dir / 'admin.sock'}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def prepare_state_dir(settings: Settings) -> None:
    """The state dir 0700 and the catalog's files 0600, whatever they were before."""
    private_dir(settings.state_dir)
    for path in settings.state_dir.glob(settings.catalog_path.name + "*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600)


async def serve(settings: Settings) -> None:
    lock_run_dir(settings.run_dir)
    prepare_state_dir(settings)
    catalog = Catalog(settings.catalog_path)
    gw = Gateway(settings, catalog)
    policy = AccessPolicy(settings.admin_group, settings.tenant_group)
    try:
        # A data plane that outlived the previous gatewayd: what it serves may be adopted.
        view = await dataplane.running(settings.run_dir)
        adopted = await reconcile(gw, view)
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await start_components(gw, nursery, view, adopted)
                ops = Dispatcher(gw)  # only a complete Gateway reaches the ops
                await nursery.start(gw.supervisor.supervise, "admin-server",
                                    AdminServer(settings.admin_socket, ops.handle, policy).run)
                if settings.libvirt_uri:
                    await nursery.start(gw.supervisor.supervise, "libvirt-watcher",
                                        functools.partial(watch_domains, gw))
                log.info("gatewayd ready", extra=fields(socket=str(settings.admin_socket),
                                                        catalog=str(settings.catalog_path),
                                                        adopted=sorted(adopted)))
                notify_systemd("READY=1")
                async with trio.open_nursery() as waiting:
                    async def on_signal() -> None:
                        async for signum in signals:
                            log.info("stopping; the data plane, qemu-storage-daemon and every "
                                     "mount stay", extra=fields(
                                         signal=signal.Signals(signum).name))
                            break
                        waiting.cancel_scope.cancel()

                    async def on_request() -> None:
                        await gw.stopping.wait()
                        await trio.sleep(STOP_ANSWER_DELAY)  # the shutdown op's answer goes out
                        waiting.cancel_scope.cancel()
                    waiting.start_soon(on_signal)
                    waiting.start_soon(on_request)
                notify_systemd("STOPPING=1")
                nursery.cancel_scope.cancel()
    finally:
        catalog.close()
    log.info("gatewayd stopped")


def view_of(gw: Gateway) -> RemoteView:
    view = gw.exports.view
    assert isinstance(view, RemoteView)
    return view


def find_file_ids(volumes: list[Volume]) -> dict[str, FileId]:
    """Identities of the image files of rows registered before they were recorded (blocking)."""
    found: dict[str, FileId] = {}
    for volume in volumes:
        try:
            fd, found[volume.name] = imagefile.open_pinned(volume.path, None)
        except GatewayError as exc:
            log.warning("image file not found at start", extra=fields(volume=volume.name,
                                                                       error=exc.message))
            continue
        os.close(fd)
    return found


async def reconcile(gw: Gateway, view: RemoteView | None) -> dict[str, Attachment]:
    """Before anything starts: record missing file identities (a catalog from before they were
    kept); adopt every attachment whose data path survived (the data plane still serves its
    window, and its loop device and mount, or its fuse2fs, are there); tear down the rest.
    Returns the adopted attachments, taken over once the components run."""
    unpinned = [v for v in gw.catalog.volumes()
                if v.file_id is None and not is_rbd_path(v.path)]  # an RBD image has no file
    if unpinned:
        ids = await trio.to_thread.run_sync(find_file_ids, unpinned)
        for name, file_id in ids.items():
            gw.catalog.update_volume(name, file_id=file_id)
    records = gw.catalog.attachments()
    run_dir = gw.settings.run_dir
    read_only = {v.name: v.read_only for v in gw.catalog.volumes()}
    candidates = [r for r in records if view is not None and r.state in SERVING
                  and view.window(r.volume) == (r.window_start, r.window_size)]

    def check() -> dict[str, Attachment]:
        found = {}
        for r in candidates:
            att = adoptable(run_dir, r.volume, r.mode, r.entries,
                            read_only=read_only.get(r.volume, False))
            if att is not None:
                found[r.volume] = att
        return found
    adopted = await trio.to_thread.run_sync(check)
    torn = [r for r in records if r.volume not in adopted]
    journals = [(r.volume, r.entries) for r in torn]
    report = await trio.to_thread.run_sync(
        lambda: reconcile_all(run_dir, journals, keep=sorted(adopted)))
    for record, (name, entries) in zip(torn, journals, strict=True):
        if journal.started_fuse2fs(entries):
            gw.catalog.set_fsck_needed(name, True)  # its fuse2fs died with the mount
        if journal.made_own_export(entries):
            gw.catalog.set_exported(name, False)  # the mount made that export
        if transition(record.state, AttachmentEvent.RESTART) is AttachmentState.ABSENT:
            gw.catalog.end_attachment(name)
    found = sum(len(v["found"]) for v in report["volumes"].values()) + len(report["sweep"]["found"])
    done = sum(len(v["done"]) for v in report["volumes"].values()) + len(report["sweep"]["done"])
    report["found"] = found
    report["cleaned"] = done
    report["adopted"] = sorted(adopted)
    gw.reconcile_report = report
    if found:
        log.warning("reconciled leftovers of a previous run",
                    extra=fields(found=found, cleaned=done, volumes=sorted(report["volumes"])))
    return adopted


async def start_components(gw: Gateway, nursery: trio.Nursery, found: RemoteView | None,
                           adopted: dict[str, Attachment]) -> None:
    """Block view, then QSD, then the shared rootfs root, then exports the catalog remembers,
    then the job table; the Gateway gets them all in one step."""
    run_dir = gw.settings.run_dir
    await trio.to_thread.run_sync(RunLayout(run_dir).prepare)  # after reconcile's sweep
    view = found or await dataplane.ensure(run_dir, log_level=gw.settings.log_level)
    # What the data plane serves for no adopted attachment lost its mounts above: let it go.
    for name in view.volumes():
        if name not in adopted:
            await view.unplug(name, force=True)
    holder: list[Exports] = []
    qsd = StorageDaemon(run_dir, lambda: holder[0].desired() if holder else [])
    qsd.keep_running = True  # it serves the data plane: it outlives gatewayd, which adopts it
    qsd.ceph = gw.ceph
    qsd.leases = gw.leases
    await nursery.start(gw.leases.run)
    exports = Exports(gw.catalog, qsd, view, nursery, locks=gw.lock,
                      linger=gw.settings.export_linger)
    holder.append(exports)
    await nursery.start(gw.supervisor.supervise, "qsd", qsd.run)
    await trio.to_thread.run_sync(prepare_rootfs_root, run_dir)
    rootfs = RootfsManager(run_dir, gw.catalog, exports, view, gw.lock, nursery)
    rootfs.userns_range = gw.settings.userns_range
    metrics = Metrics(lambda: len(gw.catalog.volumes()), lambda: len(exports.active),
                      lambda: len(rootfs.active))
    metrics.leftovers_found.inc(gw.reconcile_report.get("found", 0))
    metrics.leftovers_cleaned.inc(gw.reconcile_report.get("cleaned", 0))
    rootfs.on_phase.append(metrics.observe_phase)
    metrics.track_userns(lambda: len(gw.catalog.userns_slices()))
    metrics.track_leases(lambda: len(gw.leases.fenced()), lambda: gw.leases.fencings)
    gw.leases.on_fenced = Fencer(rootfs, exports, gw.lock)
    await exports.restore()
    await take_leases(gw, exports, [*adopted, *gw.reconcile_report.get("volumes", {})])
    for name, att in adopted.items():
        try:
            await rootfs.adopt(name, att)
        except GatewayError as exc:
            log.error("adopting an attachment failed", extra=fields(volume=name,
                                                                    error=exc.message))
    gw.supervisor.on_failure.append(metrics.count_component_failure)
    guard = DataPlaneGuard(view, run_dir, rootfs, exports, log_level=gw.settings.log_level)
    guard.on_death.append(metrics.dataplane_deaths.inc)
    await nursery.start(gw.supervisor.supervise, "dataplane-watcher", guard.run)
    await nursery.start(gw.supervisor.supervise, "jobs", gw.jobs.run)
    gw.attach(Components(qsd=qsd, exports=exports, rootfs=rootfs, metrics=metrics,
                         dataplane=guard))


async def take_leases(gw: Gateway, exports: Exports, attached: list[str]) -> None:
    """The writable RBD exports this gatewayd serves (adopted from its predecessor, whose lease
    it cannot renew) need their writer lease back before it lapses; so do the volumes whose
    attachments it adopted or tore down. One that another host holds now was fenced."""
    for name in sorted({*exports.active, *attached}):
        image = gw.catalog.rbd_image(name)
        if image is None or gw.catalog.volume(name).read_only:
            continue
        try:
            await gw.leases.take(name, image, resume=True)
        except GatewayError as exc:
            log.error("could not take the writer lease of a served rbd volume",
                      extra=fields(volume=name, error=exc.message))


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="gatewayd", description="storage-gateway daemon")
    try:
        defaults = Settings()
    except ValueError as exc:
        parser.error(str(exc))
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir,
                        help="holds the SQLite catalog (env GATEWAY_STATE_DIR)")
    parser.add_argument("--run-dir", type=Path, default=defaults.run_dir,
                        help="holds admin.sock and runtime state (env GATEWAY_RUN_DIR)")
    parser.add_argument("--admin-group", default=defaults.admin_group,
                        help="group whose members may use the admin socket besides root")
    parser.add_argument("--tenant-group", default=defaults.tenant_group,
                        help="group whose members may use the admin socket as tenants: their "
                             "own volumes only (env GATEWAY_TENANT_GROUP)")
    parser.add_argument("--allowed-roots", default=None,
                        help="colon-separated directories images must live in "
                             "(env GATEWAY_ALLOWED_ROOTS)")
    parser.add_argument("--log-level", default=defaults.log_level,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                                 "error"])
    parser.add_argument("--libvirt-uri", default=defaults.libvirt_uri,
                        help="libvirt connection whose domain events gatewayd follows "
                             "(env GATEWAY_LIBVIRT_URI; empty to disable)")
    parser.add_argument("--export-linger", type=float, default=defaults.export_linger,
                        metavar="SECONDS",
                        help="keep an export a mount made open this long after the umount, for "
                             "a quick remount (env GATEWAY_EXPORT_LINGER; 0 closes at once)")
    parser.add_argument("--userns-range", default=None, metavar="START:COUNT",
                        help="host ids --userns domains get 65536-id slices of (env "
                             "GATEWAY_USERNS_RANGE; default: the /etc/subuid and /etc/subgid "
                             "entries of the system user storage-gateway)")
    parser.add_argument("--ceph-timeout", default=None, metavar="SECONDS",
                        help="seconds a Ceph cluster may take to answer before an RBD request "
                             "fails (env GATEWAY_CEPH_TIMEOUT; default 10)")
    parser.add_argument("--host-id", default=None, metavar="ID",
                        help="this host's id among the hosts sharing a Ceph cluster: the "
                             "cookie of its writer leases (env GATEWAY_HOST_ID; default the "
                             "host name)")
    parser.add_argument("--lease-seconds", default=None, metavar="SECONDS",
                        help="how long a writer lease on an RBD image lasts unless renewed: "
                             "another host may take it over that long after this one dies "
                             "(env GATEWAY_LEASE_SECONDS; default 20)")
    ns = parser.parse_args(argv)
    try:
        check_linger(ns.export_linger, "--export-linger")
        lease_seconds = (ceph_seconds(ns.lease_seconds, "--lease-seconds",
                                      default=DEFAULT_LEASE_SECONDS, least=MIN_LEASE_SECONDS)
                         if ns.lease_seconds is not None else defaults.lease_seconds)
        host = host_id(ns.host_id, "--host-id") if ns.host_id is not None else defaults.host_id
        ceph_timeout = (ceph_seconds(ns.ceph_timeout, "--ceph-timeout")
                        if ns.ceph_timeout is not None else defaults.ceph_timeout)
        id_range = (userns_range(ns.userns_range, "--userns-range")
                    if ns.userns_range is not None else defaults.userns_range)
    except ValueError as exc:
        parser.error(str(exc))
    roots = (parse_roots(ns.allowed_roots) if ns.allowed_roots is not None
             else defaults.allowed_roots)
    return Settings(state_dir=ns.state_dir.absolute(), run_dir=ns.run_dir.absolute(),
                    admin_group=ns.admin_group, tenant_group=ns.tenant_group or None,
                    allowed_roots=roots, log_level=ns.log_level,
                    libvirt_uri=ns.libvirt_uri, export_linger=ns.export_linger,
                    userns_range=id_range, ceph_timeout=ceph_timeout, host_id=host,
                    lease_seconds=lease_seconds)


def main(argv: list[str] | None = None) -> int:
    # Admin connections, exports and mounts all cost fds: take what the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
    # Nothing gatewayd makes is meant for other users: sockets, logs, the catalog and images
    # are created 0600/0700 whatever umask it was started with (the admin socket is opened up to
    # its group explicitly).
    os.umask(0o077)
    settings = parse_args(argv)
    gwlog.setup(settings.log_level)
    # No heap.retain_io_buffers() here: the block view's I/O buffers live in the data plane,
    # which retains them; in gatewayd the policy only kept freed worker-thread memory resident,
    # and RSS crept up with every mount (issue 15 soak: ~0.4-1.5 KiB per mount/umount cycle).
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = first_gateway_error(exc)
        if error is None:
            raise
        log.error("gatewayd failed", extra=fields(error=error.message, code=error.code))
        print(f"gatewayd: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
