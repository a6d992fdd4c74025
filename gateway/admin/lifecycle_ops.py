"""Admin ops for the volume lifecycle: create (overlay, copy, blank), import, resize, pool
volumes, snapshots and saved images, and jobs.

Long work (copy, blank, import, snapshot, save) runs as a job of the Gateway's JobTable
(gateway.admin.jobs): the op validates its arguments, reserves the name and answers at once with
the job; gatewayctl polls `job-status` (a progress bar on a terminal, JSON lines with --json) and
`job-cancel` stops it. Overlays are instant and answer with the volume directly.

Snapshots and saves are point-in-time copies made inside QSD (gateway.volumes.snapshot) while the
volume may be mounted and written: their job runs on the trio thread (it drives QSD over QMP) and
holds only the source volume's lock for the copy, so other volumes mount meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from gateway.admin.args import Args, MountFlags, mount_flags
from gateway.admin.gateway import Gateway
from gateway.admin.jobs import Build
from gateway.catalog import Volume
from gateway.ceph import client as ceph_client
from gateway.ceph.location import RbdImage, parse_spec
from gateway.errors import (
    AlreadyExists,
    Cancelled,
    Conflict,
    FormatError,
    InvalidArgument,
    NotFound,
)
from gateway.export.manager import chain_spec
from gateway.host import qemu_img
from gateway.log import fields
from gateway.nbd.backup import BackupTarget, Format
from gateway.volumes import lifecycle, rbd, register, save, snapshot

log = logging.getLogger("gateway.volumes.lifecycle")
READ_ONLY_FOR_OVERLAYS = "read_only_for_overlays"


def _reserve(gw: Gateway, name: str) -> None:
    """Claim a new volume name until its job ends (no row, no file yet)."""
    gw.jobs.reserve(name)
    try:
        gw.catalog.volume(name)
    except NotFound:
        return
    gw.jobs.release(name)
    raise AlreadyExists(f"volume {name} already exists")


def _reserve_image(gw: Gateway, name: str, fmt: str) -> Path:
    """Claim the name and choose the new image's path (released again if that fails)."""
    _reserve(gw, name)
    try:
        return lifecycle.new_image_path(gw.settings.state_dir, name, fmt)
    except BaseException:
        gw.jobs.release(name)
        raise


async def _register(gw: Gateway, volume: Volume, owner: int | None = None) -> dict[str, Any]:
    try:
        gw.catalog.add_volume(volume, owner=owner)
    except BaseException:
        Path(volume.path).unlink(missing_ok=True)
        raise
    log.info("volume created", extra=fields(volume=volume.name, origin=volume.origin,
                                            format=volume.format, path=volume.path))
    return gw.volume_json(volume.name)


def _start_job(gw: Gateway, kind: str, name: str, build: Build) -> dict[str, Any]:
    """Run `build` as a job that registers its volume; the name is already reserved."""
    async def finish(volume: Volume) -> dict[str, Any]:
        async with gw.lock(name):
            return await _register(gw, volume)
    return gw.jobs.start(kind, name, build, finish).to_json()


async def _create_overlay(gw: Gateway, name: str, base_name: str,
                          flags: MountFlags, owner: int | None = None) -> dict[str, Any]:
    """`owner`: the tenant that asked for it (None: the admin)."""
    async with gw.lock(base_name):
        base = gw.catalog.volume(base_name)
        await gw.exports.retire(base_name)
        if not base.read_only and (base_name in gw.catalog.exported()
                                   or gw.catalog.attachment(base_name) is not None):
            raise Conflict(f"volume {base_name} is exported or mounted writable; umount and "
                           "unexport it before making overlays of it")
        spec = chain_spec(gw.catalog, base, top=False)
        final = lifecycle.new_image_path(gw.settings.state_dir, name, "qcow2")
        volume = await trio.to_thread.run_sync(lambda: lifecycle.build_overlay(
            name, final, spec, base.virtual_size, **flags))
        if not base.read_only:
            # The base stays read-only while overlays use it; volume rm of its last overlay
            # gives its writability back.
            gw.catalog.update_volume(base_name, read_only=True,
                                     lineage={**base.lineage, READ_ONLY_FOR_OVERLAYS: True})
        try:
            async with gw.lock(name):
                return await _register(gw, volume, owner)
        except BaseException:
            if not base.read_only and not gw.catalog.overlays_of(base_name):
                gw.catalog.update_volume(base_name, read_only=False, lineage=base.lineage)
            raise


async def _rbd_source(gw: Gateway, source: str, what: str) -> tuple[Volume, RbdImage]:
    """An RBD volume to make an overlay or a copy of: not exported or mounted writable here
    (caller holds its lock); its lingering export closed."""
    base = gw.catalog.volume(source)
    image = gw.catalog.rbd_image(source)
    assert image is not None
    if not base.read_only and (source in gw.catalog.exported()
                               or gw.catalog.attachment(source) is not None):
        raise Conflict(f"volume {source} is exported or mounted writable; umount and "
                       f"unexport it before making {what} of it")
    await gw.exports.retire(source)
    return base, image


async def _register_rbd(gw: Gateway, found: rbd.Found, owner: int | None) -> dict[str, Any]:
    """Insert the row of an RBD image the gateway made; the image goes if that fails."""
    try:
        async with gw.lock(found.volume.name):
            gw.catalog.add_volume(found.volume, rbd=found.image, owner=owner)
    except BaseException:
        with trio.CancelScope(shield=True):
            await ceph_client.arun(rbd.drop_made, found.image, gw.ceph)
        raise
    log.info("volume created", extra=fields(volume=found.volume.name,
                                            origin=found.volume.origin, format="raw",
                                            image=found.image.spec))
    return gw.volume_json(found.volume.name)


async def _create_rbd_overlay(gw: Gateway, name: str, base_name: str, pool: str | None,
                              flags: MountFlags, owner: int | None) -> dict[str, Any]:
    """An overlay of an RBD volume: a snapshot + clone in the cluster (gateway.volumes.rbd), a
    plain raw RBD volume; the base stays writable (the clone does not follow it)."""
    async with gw.lock(base_name):
        base, image = await _rbd_source(gw, base_name, "overlays")
        found = await ceph_client.arun(lambda: rbd.make_overlay(
            name, base, image, pool=pool, host_id=gw.settings.host_id, config=gw.ceph,
            **flags))
    return await _register_rbd(gw, found, owner)


async def _start_rbd_copy(gw: Gateway, name: str, source: str, pool: str | None,
                          flags: MountFlags) -> dict[str, Any]:
    """A copy of an RBD volume in the cluster, as a job (the name is reserved). The source's
    lock is held while the job checks it, not for the copy: another host's lease is checked in
    the cluster, and a local mount is refused for the copy's short window only."""
    async with gw.lock(source):
        base, image = await _rbd_source(gw, source, "copies")
    made: list[rbd.Found] = []

    def build(progress: Any, cancel: threading.Event) -> Volume:
        found = rbd.make_copy(name, base, image, pool=pool, host_id=gw.settings.host_id,
                              config=gw.ceph, **flags)
        made.append(found)
        if cancel.is_set():
            rbd.drop_made(found.image, gw.ceph)
            raise Cancelled("cancelled")
        progress(100.0)
        return found.volume

    async def finish(volume: Volume) -> dict[str, Any]:
        return await _register_rbd(gw, made[0], None)
    return gw.jobs.start("copy", name, build, finish).to_json()


def release_base(gw: Gateway, base_name: str) -> None:
    """After an overlay is removed: a base made read-only for overlays gets writable again when
    its last overlay is gone (called by volume_ops.volume_remove)."""
    try:
        base = gw.catalog.volume(base_name)
    except NotFound:
        return
    if base.lineage.get(READ_ONLY_FOR_OVERLAYS) and not gw.catalog.overlays_of(base_name):
        lineage = {k: v for k, v in base.lineage.items() if k != READ_ONLY_FOR_OVERLAYS}
        gw.catalog.update_volume(base_name, read_only=False, lineage=lineage)


async def _create_from(gw: Gateway, args: Args, name: str, source: str,
                       flags: MountFlags) -> dict[str, Any]:
    """An overlay (instant) or a copy (a job) of the registered volume `source`."""
    overlay, copy = args.flag("overlay"), args.flag("copy")
    if overlay == copy:
        raise InvalidArgument("--from needs exactly one of --overlay or --copy")
    if args.given("size") or args.given("mkfs"):
        raise InvalidArgument("--size and --mkfs make a blank volume; not with --from")
    if name == source:
        raise InvalidArgument("a volume cannot be made from itself")
    declared = args.opt_text("format")
    pool = args.opt_text("pool")
    if overlay and gw.catalog.rbd_image(source) is not None:
        if declared not in (None, "raw"):
            raise InvalidArgument("an overlay of an RBD volume is an RBD clone: always raw")
        _reserve(gw, name)
        try:
            owner = args.caller.uid if args.caller.tenant else None
            return {"volume": await _create_rbd_overlay(gw, name, source, pool, flags, owner)}
        finally:
            gw.jobs.release(name)
    if copy and gw.catalog.rbd_image(source) is not None:
        if declared not in (None, "raw"):
            raise InvalidArgument("a copy of an RBD volume is an RBD image: always raw")
        _reserve(gw, name)
        try:
            return await _start_rbd_copy(gw, name, source, pool, flags)
        except BaseException:
            gw.jobs.release(name)
            raise
    if pool is not None:
        raise InvalidArgument("--pool picks the Ceph pool of an overlay or a copy of an RBD "
                              "volume; not for this volume")
    if overlay:
        if declared not in (None, "qcow2"):
            raise InvalidArgument("an overlay is always qcow2")
        _reserve(gw, name)
        try:
            owner = args.caller.uid if args.caller.tenant else None
            return {"volume": await _create_overlay(gw, name, source, flags, owner)}
        finally:
            gw.jobs.release(name)
    _reserve(gw, name)
    try:
        fmt = declared or gw.catalog.volume(source).format
        async with gw.lock(source):
            base = gw.catalog.volume(source)
            await gw.exports.retire(source)
            spec = chain_spec(gw.catalog, base, top=False)
            if not base.read_only and (source in gw.catalog.exported()
                                       or gw.catalog.attachment(source) is not None):
                raise Conflict(f"volume {source} is exported or mounted writable; umount "
                               "and unexport it before copying")
        final = lifecycle.new_image_path(gw.settings.state_dir, name, fmt)
    except BaseException:
        gw.jobs.release(name)
        raise
    return _start_job(gw, "copy", name, lambda progress, cancel: lifecycle.build_copy(
        name, final, spec, fmt, progress=progress, cancel=cancel, **flags))


def _start_rbd_blank(gw: Gateway, args: Args, name: str, pool: str,
                     flags: MountFlags) -> dict[str, Any]:
    """A blank filesystem volume in a Ceph pool, as a job: built in a scratch file under
    STATE_DIR/volumes, then written into a new image POOL/NAME (gateway.volumes.rbd)."""
    if args.text("format") != "raw":
        raise InvalidArgument("a volume in a Ceph pool is raw: give --format raw")
    image = parse_spec(f"{pool}/{name}", conf=args.opt_text("ceph_conf"),
                       user=args.opt_text("ceph_user"))
    size, fs = args.number("size"), args.text("mkfs")
    label, partitioned = args.opt_text("label"), args.flag("partitioned")
    _reserve(gw, name)
    made: list[rbd.Found] = []

    def build(progress: Any, cancel: threading.Event) -> Volume:
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.rbd-",
                                        dir=lifecycle.volumes_dir(gw.settings.state_dir)))
        try:
            found = rbd.make_blank(name, image, size, fs, label=label, partitioned=partitioned,
                                   scratch=scratch, progress=progress, cancel=cancel,
                                   config=gw.ceph, **flags)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        made.append(found)
        return found.volume

    async def finish(volume: Volume) -> dict[str, Any]:
        return await _register_rbd(gw, made[0], None)
    try:
        return gw.jobs.start("blank", name, build, finish).to_json()
    except BaseException:
        gw.jobs.release(name)
        raise


async def volume_create(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    source = args.opt_text("from")
    flags = mount_flags(args)
    if source is not None:
        return await _create_from(gw, args, name, source, flags)
    size = args.number("size")
    fmt = args.text("format")
    fs = args.text("mkfs")
    label = args.opt_text("label")
    partitioned = args.flag("partitioned")
    lifecycle.check_blank(size, fmt, fs, label)
    pool = args.opt_text("pool")
    if pool is not None:
        return _start_rbd_blank(gw, args, name, pool, flags)
    if args.given("ceph_conf") or args.given("ceph_user"):
        raise InvalidArgument("--ceph-conf and --ceph-user go with --pool (a volume in a Ceph "
                              "pool)")
    final = _reserve_image(gw, name, fmt)
    return _start_job(gw, "blank", name, lambda progress, cancel: lifecycle.build_blank(
        name, final, size, fmt, fs, label=label, partitioned=partitioned, progress=progress,
        cancel=cancel, **flags))


async def volume_import(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    tarball = args.text("tarball")

    def find() -> Path:  # path walks never run on the trio thread (it serves the block view)
        found = register.resolve_image_path(tarball, gw.settings.allowed_roots, gw.own_dirs)
        if not found.is_file():
            raise NotFound(f"{tarball}: no such file")
        return found
    source = await trio.to_thread.run_sync(find)
    size = args.number("size")
    fmt = args.text("format")
    label = args.opt_text("label")
    partitioned = args.flag("partitioned")
    lifecycle.check_blank(size, fmt, "ext4", label)
    flags = mount_flags(args)
    final = _reserve_image(gw, name, fmt)

    def build(progress: Callable[[float], None], cancel: threading.Event) -> Volume:
        volume = lifecycle.build_import(name, final, source, size, fmt, label=label,
                                        partitioned=partitioned, progress=progress,
                                        cancel=cancel)
        return dataclasses.replace(volume, **flags)
    return _start_job(gw, "import", name, build)


# ---- snapshots and saved images ------------------------------------------------------------------


def _pinned(fmt: str) -> Format:
    return "qcow2" if register.check_format(fmt) == "qcow2" else "raw"


def _qsd_job_id(kind: str) -> str:
    """A QSD job id (a well-formed qemu id, unique in this QSD)."""
    return f"gw-{kind}-{uuid.uuid4().hex[:12]}"


async def _instant_of(gw: Gateway, name: str) -> tuple[str | None, Path | None, Path | None]:
    """How volume `name` is used now (caller holds its lock): the attachment's mode (None: not
    mounted), the bind mode's kernel mount RUN_DIR/mnt/NAME if it is there to freeze, and the
    fuse mode's fuse2fs mount RUN_DIR/rootfs/NAME if it is there to sync. A released host view
    leaves neither (the container's private copy of the mount is not the host's to freeze)."""
    from gateway.attach import journal
    from gateway.host import mounts
    record = gw.catalog.attachment(name)
    if record is None:
        return None, None, None
    if journal.host_view_released(record.entries):
        return record.mode, None, None
    mnt = gw.settings.run_dir / "mnt" / name
    rootfs = gw.settings.run_dir / "rootfs" / name

    def look() -> tuple[Path | None, Path | None]:  # mountinfo: never on the trio thread
        kernel = mnt if record.mode == "bind" and mounts.is_mountpoint(mnt) else None
        fuse = rootfs if record.mode == "fuse" and mounts.is_mountpoint(rootfs) else None
        return kernel, fuse
    kernel, fuse = await trio.to_thread.run_sync(look)
    return record.mode, kernel, fuse


async def _copy_now(gw: Gateway, name: str, target: BackupTarget,
                    progress: Callable[[float], None], cancel: trio.Event) -> snapshot.Taken:
    """The point-in-time copy of `name` into `target` (caller holds the volume lock)."""
    mode, kernel, fuse = await _instant_of(gw, name)
    return await snapshot.take(gw.exports, name, target, mounted=mode, kernel_mount=kernel,
                               fuse_mount=fuse, progress=progress, cancel=cancel,
                               on_freeze=gw.metrics.observe_freeze)


def _check_going(cancel: trio.Event, what: str) -> None:
    """A job told to stop while it waited for the volume lock does not start its copy."""
    if cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def _remove_files(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _snapshot_volume(name: str, partial: Path, final: Path, fmt: str, source: Volume,
                     lineage: dict[str, Any]) -> Volume:
    """Blocking: the copied image renamed into place and checked like `volume add` (the header
    inspector, through lifecycle.registered), as a row inheriting the source's mount flags and
    pinned filesystem type."""
    if final.exists():
        raise AlreadyExists(f"{final} already exists")
    os.rename(partial, final)
    volume = lifecycle.registered(name, final, fmt, origin="snapshot", lineage=lineage,
                                  nosuid=source.nosuid, noexec=source.noexec)
    if volume.virtual_size != source.virtual_size:
        raise FormatError(f"snapshot {name}: the image is {volume.virtual_size} bytes, not "
                          f"{source.virtual_size}")
    return dataclasses.replace(volume, fstype=source.fstype)


async def volume_snapshot(gw: Gateway, args: Args) -> dict[str, Any]:
    """A point-in-time copy of a volume, mounted and written or not, registered as a new volume
    (origin "snapshot", format pinned, lineage: what it is a snapshot of, when, how consistent,
    how long the filesystem was frozen). A crash-consistent snapshot is marked for a filesystem
    check before its first fuse-mode mount."""
    name, new = args.text("name"), args.text("to")
    if new == name:
        raise InvalidArgument("a snapshot needs a new volume name (--to), not its source's")
    fmt = _pinned(args.opt_text("format") or gw.catalog.volume(name).format)
    rate = args.opt_number("rate_limit")
    final = _reserve_image(gw, new, fmt)
    partial = final.with_name(f".{final.name}.partial")

    async def body(progress: Callable[[float], None], cancel: trio.Event) -> dict[str, Any]:
        try:
            async with gw.lock(name):
                _check_going(cancel, f"snapshot {new}")
                source = gw.catalog.volume(name)
                await trio.to_thread.run_sync(lambda: qemu_img.create(
                    partial, fmt, source.virtual_size))
                target = BackupTarget(job_id=_qsd_job_id("snap"), path=str(partial), fmt=fmt,
                                      rate_limit=rate)
                taken = await _copy_now(gw, name, target, progress, cancel)
            when = taken.to_json()
            lineage = {"snapshot_of": name, **when, "layers": [], "source": name,
                       "params": {"format": fmt, "source_format": source.format},
                       "summary": f"snapshot of {name} at {when['at']} ({taken.consistency})"}
            volume = await trio.to_thread.run_sync(lambda: _snapshot_volume(
                new, partial, final, fmt, source, lineage))
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_files, partial, final)
            raise
        async with gw.lock(new):
            if cancel.is_set():  # told to stop after the copy: not registered
                await trio.to_thread.run_sync(_remove_files, final)
                raise Cancelled(f"snapshot {new} cancelled")
            result = await _register(gw, volume)
            if taken.consistency == snapshot.CRASH_CONSISTENT:
                gw.catalog.set_fsck_needed(new, True)
        gw.metrics.count_snapshot(taken.consistency)
        log.info("snapshot taken", extra=fields(volume=new, source=name, format=fmt, **when))
        return result

    try:
        return gw.jobs.start_async("snapshot", new, body).to_json()
    except BaseException:
        gw.jobs.release(new)
        raise


async def volume_save(gw: Gateway, args: Args) -> dict[str, Any]:
    """A volume written out as an image file (format pinned by the request, qcow2 optionally
    compressed) under the allowed roots: a point-in-time copy like a snapshot, into a file made
    by gatewayd (gateway.volumes.save), checked by the header inspector, then published under
    its name; an existing file is replaced only with `force`."""
    name, file = args.text("name"), args.text("file")
    fmt = _pinned(args.text("format"))
    compress, force = args.flag("compress"), args.flag("force")
    rate = args.opt_number("rate_limit")
    if compress and fmt != "qcow2":
        raise InvalidArgument("--compress needs --format qcow2")
    gw.catalog.volume(name)
    out = await trio.to_thread.run_sync(lambda: save.create_output(
        file, allowed_roots=gw.settings.allowed_roots, forbidden=gw.own_dirs, force=force))

    async def body(progress: Callable[[float], None], cancel: trio.Event) -> dict[str, Any]:
        try:
            async with gw.lock(name):
                _check_going(cancel, f"save of {name}")
                source = gw.catalog.volume(name)
                await trio.to_thread.run_sync(save.format_output, out, fmt, source.virtual_size)
                target = BackupTarget(job_id=_qsd_job_id("save"), path=out.proc_path, fmt=fmt,
                                      compress=compress, rate_limit=rate)
                taken = await _copy_now(gw, name, target, progress, cancel)
            size = await trio.to_thread.run_sync(save.check_output, out, fmt,
                                                 source.virtual_size)
            if cancel.is_set():
                raise Cancelled(f"save of {name} cancelled")
            await trio.to_thread.run_sync(out.publish)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(out.remove)
            raise
        finally:
            with trio.CancelScope(shield=True):  # a close may flush: not on the trio thread
                await trio.to_thread.run_sync(out.close)
        gw.metrics.count_snapshot(taken.consistency)
        log.info("volume saved", extra=fields(volume=name, file=str(out.path), format=fmt,
                                              compress=compress, **taken.to_json()))
        return {"name": name, "file": str(out.path), "format": fmt, "compress": compress,
                "virtual_size": source.virtual_size, "bytes": size, **taken.to_json()}

    try:
        return gw.jobs.start_async("save", name, body, reserved=False).to_json()
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(out.remove)
        raise


async def job_status(gw: Gateway, args: Args) -> dict[str, Any]:
    return gw.jobs.get(args.text("id")).to_json()


async def job_cancel(gw: Gateway, args: Args) -> dict[str, Any]:
    """Stop a running job: its worker is told to stop (qemu-img and the import worker are
    killed); the job then ends "failed" with code "cancelled" and leaves no file behind."""
    return gw.jobs.cancel(args.text("id")).to_json()


async def job_list(gw: Gateway, args: Args) -> list[dict[str, Any]]:
    return [j.to_json() for j in gw.jobs.list()]


async def _grow_filesystem(gw: Gateway, name: str) -> dict[str, Any]:
    """Grow the partition (if any) and the filesystem of an unmounted volume through the
    gateway's own export and block view (RUN_DIR/blk/NAME/disk and .../rootfs): the same path
    for raw and qcow2, no loop device, nothing mounted for ext4."""
    from gateway.host import mkfs
    from gateway.probe.core import probe_reader_async
    auto_export = not gw.exports.in_use(name)
    export = await gw.exports.open(name)
    view = gw.exports.view
    blk = gw.settings.run_dir / "blk" / name
    try:
        found = await probe_reader_async(export.backend.read_at, export.backend.size)
        table = found.to_json()["table"]
        if table != "none":
            if found.rootfs.number != 1 or len(found.partitions) != 1:
                raise Conflict(f"volume {name}: only a disk with one partition can be grown")
            await trio.to_thread.run_sync(mkfs.grow_last_partition, blk / "disk")
            found = await probe_reader_async(export.backend.read_at, export.backend.size)
        fs = found.rootfs.fs or "unknown"
        if fs not in ("ext2", "ext3", "ext4"):
            return {"fs": fs, "grown": False, "table": table}
        await view.set_window(name, found.rootfs.start, found.rootfs.size)
        try:
            await trio.to_thread.run_sync(mkfs.resize_ext4, blk / "rootfs")
        finally:
            await view.close_window(name)
        await export.backend.flush()
        return {"fs": fs, "grown": True, "table": table}
    finally:
        if auto_export:
            with trio.CancelScope(shield=True):
                await gw.exports.close(name)


async def volume_resize(gw: Gateway, args: Args) -> dict[str, Any]:
    """Grow a volume's image (qemu-img resize -f PINNED) and then its filesystem: ext4 offline
    through the block view; xfs online (mounted by the gateway for xfs_growfs)."""
    from gateway.host import imagefile, mkfs, qemu_img
    name = args.text("name")
    size = args.number("size")
    async with gw.lock(name):
        volume = gw.catalog.volume(name)
        if size < volume.virtual_size:
            raise InvalidArgument(f"volume {name}: shrinking ({volume.virtual_size} -> {size} "
                                  "bytes) is refused")
        if gw.catalog.overlays_of(name):
            raise Conflict(f"volume {name} is the base of overlays; it cannot change")
        if volume.read_only or volume.block_device:
            raise Conflict(f"volume {name} is read-only or a block device; it cannot grow")
        await gw.exports.retire(name)
        if gw.catalog.attachment(name) is not None or name in gw.catalog.exported():
            raise Conflict(f"volume {name} is mounted or exported; umount and unexport it first")
        image = gw.catalog.rbd_image(name)
        if image is not None and size > volume.virtual_size:
            await gw.leases.take(name, image)  # the image changes: one writer across hosts
            await ceph_client.arun(ceph_client.resize, image, gw.ceph, size)
        elif size > volume.virtual_size:  # equal: only grow the filesystem (a retry)
            def grow() -> None:
                with imagefile.pinned([(volume.path, volume.file_id)]) as [path]:
                    qemu_img.resize(path, volume.format, size)
            await trio.to_thread.run_sync(grow)
        if size > volume.virtual_size:
            lineage = {**volume.lineage, "resized": [*volume.lineage.get("resized", []), size]}
            gw.catalog.update_volume(name, virtual_size=size, lineage=lineage)
        grown = await _grow_filesystem(gw, name)
    if grown["fs"] == "xfs":
        mounted = await gw.rootfs.mount(name, "bind")
        try:
            await trio.to_thread.run_sync(mkfs.grow_xfs, Path(mounted["rootfs"]))
        finally:
            with trio.CancelScope(shield=True):
                await gw.rootfs.umount(name)
                async with gw.lock(name):
                    await gw.exports.retire(name)  # resize leaves the image file free
        grown["grown"] = True
    log.info("volume resized", extra=fields(volume=name, size=size, **grown))
    return {**gw.volume_json(name), "filesystem": grown}


async def volume_add_pool(gw: Gateway, args: Args) -> dict[str, Any]:
    """`volume add` for a libvirt pool volume: the path comes from libvirt; the format is the
    admin's, and must agree with what the pool says (dir pools probe formats: never trusted
    alone). The libvirt connection is gatewayd's own: a request cannot name a URI (a URI's
    transport can run a program as root; args refuses the key)."""
    from gateway.libvirt import pools
    from gateway.libvirt.connection import DEFAULT_URI
    name = args.text("name")
    pool, vol = args.text("pool"), args.text("vol")
    declared = args.opt_text("format")
    if declared is None:
        raise InvalidArgument("--format is required for a pool volume (libvirt's dir pools "
                              "guess formats; the gateway pins only what the admin declares)")
    flags = mount_flags(args)
    fstype, read_only = args.opt_text("fstype"), args.flag("read_only")
    uri = pools.check_uri(gw.libvirt_uri or DEFAULT_URI)
    async with gw.lock(name):
        found = await trio.to_thread.run_sync(pools.resolve, uri, pool, vol)
        if found.format != declared:
            raise FormatError(f"pool {pool} volume {vol}: libvirt says {found.format}, the "
                              f"admin declared {declared}; refusing to pin either")
        checked = await trio.to_thread.run_sync(lambda: register.examine(
            name, found.path, declared, read_only=read_only, fstype=fstype,
            allowed_roots=gw.settings.allowed_roots, forbidden=gw.own_dirs, **flags))
        volume = dataclasses.replace(checked, origin="pool", lineage={
            "layers": [], "source": found.to_json(), "params": {"format": declared}})
        gw.catalog.add_volume(volume)
    log.info("pool volume added", extra=fields(volume=name, pool=pool, vol=vol,
                                               format=declared))
    return gw.volume_json(name)
