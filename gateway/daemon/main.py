"""gatewayd: the trio service behind the admin socket."""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import trio

from gateway import log as gwlog
from gateway.admin.server import AccessPolicy, AdminServer
from gateway.admin.service import Gateway
from gateway.attach.attachment import RunLayout, prepare_rootfs_root, private_dir
from gateway.attach.manager import RootfsManager, made_own_export, reconcile_all
from gateway.catalog import Catalog, Volume
from gateway.config import Settings, check_linger, parse_roots
from gateway.daemon import heap
from gateway.daemon.metrics import Metrics
from gateway.errors import GatewayError, first_gateway_error
from gateway.export.manager import Exports
from gateway.fuse.blockview import BlockView
from gateway.host import imagefile
from gateway.host.imagefile import FileId
from gateway.libvirt.domains import watch_domains
from gateway.log import fields
from gateway.nbd.qsd import StorageDaemon

log = logging.getLogger("gateway.daemon.main")

# Modules whose @op functions the admin socket serves (imported for their registrations).
OP_MODULES: tuple[str, ...] = ("gateway.admin.service", "gateway.libvirt.domains",
                               "gateway.admin.lifecycle_ops")


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
        raise GatewayError(f"another gatewayd is serving {run_dir / 'admin.sock'}",
                           code="conflict") from None
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
    policy = AccessPolicy(settings.admin_group)
    try:
        await reconcile(gw)
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await start_components(gw, nursery)
                await nursery.start(AdminServer(settings.admin_socket, gw.handle, policy).run)
                if settings.libvirt_uri:
                    await nursery.start(watch_domains, gw)
                log.info("gatewayd ready", extra=fields(socket=str(settings.admin_socket),
                                                        catalog=str(settings.catalog_path)))
                notify_systemd("READY=1")
                async for signum in signals:
                    log.info("shutting down", extra=fields(signal=signal.Signals(signum).name))
                    notify_systemd("STOPPING=1")
                    with trio.move_on_after(60):
                        await gw.rootfs.unmount_all()
                        await gw.exports.close_all()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        catalog.close()
    log.info("gatewayd stopped")


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


async def reconcile(gw: Gateway) -> None:
    """Before anything starts: record missing file identities (a catalog from before they were
    kept), then tear down what a crashed gatewayd left behind."""
    unpinned = [v for v in gw.catalog.volumes() if v.file_id is None]
    if unpinned:
        ids = await trio.to_thread.run_sync(find_file_ids, unpinned)
        for name, file_id in ids.items():
            gw.catalog.update_volume(name, file_id=file_id)
    journals = [(r.volume, r.steps) for r in gw.catalog.attachments()]
    report = await trio.to_thread.run_sync(reconcile_all, gw.settings.run_dir, journals)
    for name, steps in journals:
        if any(step == "fuse2fs" for step, _ in steps):
            gw.catalog.set_fsck_needed(name, True)  # its fuse2fs died with the daemon
        if made_own_export(steps):
            gw.catalog.set_exported(name, False)  # the mount made that export
        gw.catalog.end_attachment(name)
    found = sum(len(v["found"]) for v in report["volumes"].values()) + len(report["sweep"]["found"])
    done = sum(len(v["done"]) for v in report["volumes"].values()) + len(report["sweep"]["done"])
    report["found"] = found
    report["cleaned"] = done
    gw.reconcile_report = report
    if found:
        log.warning("reconciled leftovers of a previous run",
                    extra=fields(found=found, cleaned=done, volumes=sorted(report["volumes"])))


async def start_components(gw: Gateway, nursery: trio.Nursery) -> None:
    """Block view, then QSD, then the shared rootfs root, then exports the catalog remembers."""
    run_dir = gw.settings.run_dir
    await trio.to_thread.run_sync(RunLayout(run_dir).prepare)  # after reconcile's sweep
    view = BlockView()
    await nursery.start(view.run, run_dir / "blk")
    holder: list[Exports] = []
    qsd = StorageDaemon(run_dir, lambda: holder[0].desired() if holder else [])
    exports = Exports(gw.catalog, qsd, view, nursery, locks=gw.lock,
                      linger=gw.settings.export_linger)
    holder.append(exports)
    await nursery.start(qsd.run)
    await trio.to_thread.run_sync(prepare_rootfs_root, run_dir)
    rootfs = RootfsManager(run_dir, gw.catalog, exports, view, gw.lock, nursery)
    gw.attach_components(qsd, exports, rootfs)
    metrics = Metrics(lambda: len(gw.catalog.volumes()), lambda: len(exports.active),
                      lambda: len(rootfs.active))
    metrics.leftovers_found.inc(gw.reconcile_report.get("found", 0))
    metrics.leftovers_cleaned.inc(gw.reconcile_report.get("cleaned", 0))
    rootfs.on_phase.append(metrics.observe_phase)
    gw.metrics = metrics
    await exports.restore()


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
    ns = parser.parse_args(argv)
    try:
        check_linger(ns.export_linger, "--export-linger")
    except ValueError as exc:
        parser.error(str(exc))
    roots = (parse_roots(ns.allowed_roots) if ns.allowed_roots is not None
             else defaults.allowed_roots)
    return Settings(state_dir=ns.state_dir.absolute(), run_dir=ns.run_dir.absolute(),
                    admin_group=ns.admin_group, allowed_roots=roots, log_level=ns.log_level,
                    libvirt_uri=ns.libvirt_uri, export_linger=ns.export_linger)


def main(argv: list[str] | None = None) -> int:
    # Admin connections, exports and mounts all cost fds: take what the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
    # Nothing gatewayd makes is meant for other users: sockets, logs, the catalog and images
    # are created 0600/0700 whatever umask it was started with (the admin socket is opened up to
    # its group explicitly).
    os.umask(0o077)
    settings = parse_args(argv)
    for module in OP_MODULES:
        importlib.import_module(module)
    gwlog.setup(settings.log_level)
    heap.retain_io_buffers()
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
