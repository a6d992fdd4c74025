"""Admin ops for the volume lifecycle: create (overlay, copy, blank), import, resize, jobs.

The admin protocol is one request, one response. Long work (copy, blank, import) therefore runs
as a job in the daemon: the op validates its arguments, reserves the name and answers at once with
`{"job": ID}`; `job-status` reports `state` (running|done|failed), `progress` (0-100) and, at the
end, the new volume or the error. gatewayctl polls it (a progress bar on a terminal, JSON lines
with --json). Overlays are instant and answer with the volume directly. Jobs live in memory: a
gatewayd stopped mid-job cancels it and removes its partial files.

Blocking work runs in worker threads; a cancelled job (daemon shutdown) sets the thread's cancel
event, which kills qemu-img and stops extraction, and the partial files are removed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from gateway.admin.service import Gateway, MountFlags, arg_bool, mount_flags, op
from gateway.catalog import Volume
from gateway.errors import (
    AlreadyExists,
    Conflict,
    FormatError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    first_gateway_error,
)
from gateway.export.manager import chain_spec
from gateway.log import fields
from gateway.volumes import lifecycle, register

log = logging.getLogger("gateway.volumes.lifecycle")
MAX_FINISHED_JOBS = 100
READ_ONLY_FOR_OVERLAYS = "read_only_for_overlays"


@dataclass
class Job:
    id: str
    kind: str
    volume: str
    state: str = "running"
    progress: float = 0.0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"job": self.id, "kind": self.kind, "volume": self.volume, "state": self.state,
                "progress": round(self.progress, 1), "result": self.result, "error": self.error,
                "seconds": round((self.finished or time.time()) - self.started, 3)}


JOBS: dict[str, Job] = {}
RESERVED: set[str] = set()
_ids = itertools.count(1)


def _reserve(gw: Gateway, name: str) -> None:
    """Claim a new volume name until its job ends (no row, no file yet)."""
    if name in RESERVED:
        raise AlreadyExists(f"volume {name} is being created")
    try:
        gw.catalog.volume(name)
    except NotFound:
        RESERVED.add(name)
        return
    raise AlreadyExists(f"volume {name} already exists")


def _reserve_image(gw: Gateway, name: str, fmt: str) -> Path:
    """Claim the name and choose the new image's path (released again if that fails)."""
    _reserve(gw, name)
    try:
        return lifecycle.new_image_path(gw.settings.state_dir, name, fmt)
    except BaseException:
        RESERVED.discard(name)
        raise


def _prune() -> None:
    finished = [j for j in JOBS.values() if j.state != "running"]
    for job in finished[:-MAX_FINISHED_JOBS]:
        del JOBS[job.id]


async def _register(gw: Gateway, volume: Volume) -> dict[str, Any]:
    try:
        gw.catalog.add_volume(volume)
    except BaseException:
        Path(volume.path).unlink(missing_ok=True)
        raise
    log.info("volume created", extra=fields(volume=volume.name, origin=volume.origin,
                                            format=volume.format, path=volume.path))
    return gw.volume_json(volume.name)


Build = Callable[[Callable[[float], None], threading.Event], Volume]


def start_job(gw: Gateway, kind: str, name: str, build: Build) -> dict[str, Any]:
    """Run `build(progress, cancel)` in a worker thread as a job; the name is already reserved."""
    job = Job(id=str(next(_ids)), kind=kind, volume=name)
    JOBS[job.id] = job
    _prune()
    cancel = threading.Event()

    def progress(percent: float) -> None:
        job.progress = max(job.progress, min(100.0, percent))  # a float store: thread-safe

    async def run() -> None:
        try:
            async with trio.open_nursery() as nursery:
                async def watch_cancel() -> None:
                    try:
                        await trio.sleep_forever()
                    finally:
                        cancel.set()
                nursery.start_soon(watch_cancel)
                # Jobs have their own few worker threads: mounts never wait behind them.
                volume = await trio.to_thread.run_sync(build, progress, cancel,
                                                       limiter=gw.job_limiter)
                nursery.cancel_scope.cancel()
            async with gw.lock(name):
                job.result = await _register(gw, volume)
            job.progress = 100.0
            job.state = "done"
        except Exception as exc:
            error = first_gateway_error(exc)
            if error is None:
                job.state, job.error = "failed", {"code": "internal", "message": str(exc)}
                log.exception("job crashed", extra=fields(job=job.id, volume=name))
            else:
                job.state, job.error = "failed", {"code": error.code, "message": error.message}
                log.warning("job failed", extra=fields(job=job.id, volume=name,
                                                       error=error.message))
        finally:
            job.finished = time.time()
            if job.state == "running":
                job.state, job.error = "failed", {"code": "cancelled",
                                                  "message": "gatewayd stopped"}
            RESERVED.discard(name)

    gw.exports.nursery.start_soon(run)
    return job.to_json()


async def _create_overlay(gw: Gateway, name: str, base_name: str,
                          flags: MountFlags) -> dict[str, Any]:
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
                return await _register(gw, volume)
        except BaseException:
            if not base.read_only and not gw.catalog.overlays_of(base_name):
                gw.catalog.update_volume(base_name, read_only=False, lineage=base.lineage)
            raise


def release_base(gw: Gateway, base_name: str) -> None:
    """After an overlay is removed: a base made read-only for overlays gets writable again when
    its last overlay is gone (called by service.volume_remove)."""
    try:
        base = gw.catalog.volume(base_name)
    except NotFound:
        return
    if base.lineage.get(READ_ONLY_FOR_OVERLAYS) and not gw.catalog.overlays_of(base_name):
        lineage = {k: v for k, v in base.lineage.items() if k != READ_ONLY_FOR_OVERLAYS}
        gw.catalog.update_volume(base_name, read_only=False, lineage=lineage)


def _str(args: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{key} must be a non-empty string")
    return value


@op("volume-create")
async def volume_create(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    source = _str(args, "from")
    flags = mount_flags(args)
    if source is not None:
        source = register.check_name(source)
        overlay, copy = arg_bool(args, "overlay"), arg_bool(args, "copy")
        if overlay == copy:
            raise InvalidArgument("--from needs exactly one of --overlay or --copy")
        if args.get("size") is not None or args.get("mkfs") is not None:
            raise InvalidArgument("--size and --mkfs make a blank volume; not with --from")
        if name == source:
            raise InvalidArgument("a volume cannot be made from itself")
        if overlay:
            if args.get("format") not in (None, "qcow2"):
                raise InvalidArgument("an overlay is always qcow2")
            _reserve(gw, name)
            try:
                return {"volume": await _create_overlay(gw, name, source, flags)}
            finally:
                RESERVED.discard(name)
        _reserve(gw, name)
        try:
            fmt = register.check_format(args.get("format") or gw.catalog.volume(source).format)
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
            RESERVED.discard(name)
            raise
        return start_job(gw, "copy", name, lambda progress, cancel: lifecycle.build_copy(
            name, final, spec, fmt, progress=progress, cancel=cancel, **flags))
    size = lifecycle.parse_size(args.get("size"))
    fmt = register.check_format(args.get("format"))
    fs = _str(args, "mkfs", required=True)
    assert fs is not None
    label = _str(args, "label")
    partitioned = arg_bool(args, "partitioned")
    lifecycle.check_blank(size, fmt, fs, label)
    final = _reserve_image(gw, name, fmt)
    return start_job(gw, "blank", name, lambda progress, cancel: lifecycle.build_blank(
        name, final, size, fmt, fs, label=label, partitioned=partitioned, progress=progress,
        cancel=cancel, **flags))


@op("volume-import")
async def volume_import(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    tarball = args.get("tarball")

    def find() -> Path:  # path walks never run on the trio thread (it serves the block view)
        found = register.resolve_image_path(tarball, gw.settings.allowed_roots, gw.own_dirs)
        if not found.is_file():
            raise NotFound(f"{tarball}: no such file")
        return found
    source = await trio.to_thread.run_sync(find)
    size = lifecycle.parse_size(args.get("size"))
    fmt = register.check_format(args.get("format") or "raw")
    label = _str(args, "label")
    partitioned = arg_bool(args, "partitioned")
    lifecycle.check_blank(size, fmt, "ext4", label)
    final = _reserve_image(gw, name, fmt)
    flags = mount_flags(args)

    def build(progress: Callable[[float], None], cancel: threading.Event) -> Volume:
        volume = lifecycle.build_import(name, final, source, size, fmt, label=label,
                                        partitioned=partitioned, progress=progress,
                                        cancel=cancel)
        return dataclasses.replace(volume, **flags)
    return start_job(gw, "import", name, build)


@op("job-status")
async def job_status(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    job = JOBS.get(str(args.get("id")))
    if job is None:
        raise NotFound(f"no job {args.get('id')}")
    return job.to_json()


@op("job-list")
async def job_list(gw: Gateway, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [j.to_json() for j in JOBS.values()]



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
        view.set_window(name, found.rootfs.start, found.rootfs.size)
        try:
            await trio.to_thread.run_sync(mkfs.resize_ext4, blk / "rootfs")
        finally:
            view.clear_window(name)
        await export.backend.flush()
        return {"fs": fs, "grown": True, "table": table}
    finally:
        if auto_export:
            with trio.CancelScope(shield=True):
                await gw.exports.close(name)


@op("volume-resize")
async def volume_resize(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """Grow a volume's image (qemu-img resize -f PINNED) and then its filesystem: ext4 offline
    through the block view; xfs online (mounted by the gateway for xfs_growfs)."""
    from gateway.host import imagefile, mkfs, qemu_img
    name = register.check_name(args.get("name"))
    size = lifecycle.parse_size(args.get("size"))
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
        if size > volume.virtual_size:  # equal: only grow the filesystem (a retry)
            def grow() -> None:
                with imagefile.pinned([(volume.path, volume.file_id)]) as [path]:
                    qemu_img.resize(path, volume.format, size)
            await trio.to_thread.run_sync(grow)
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


@op("volume-add-pool")
async def volume_add_pool(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """`volume add` for a libvirt pool volume: the path comes from libvirt; the format is the
    admin's, and must agree with what the pool says (dir pools probe formats: never trusted
    alone). The libvirt connection is gatewayd's own: a request cannot name a URI (a URI's
    transport can run a program as root)."""
    from gateway.libvirt import pools
    from gateway.libvirt.connection import DEFAULT_URI
    name = register.check_name(args.get("name"))
    if "uri" in args:
        raise PermissionDenied("a request cannot name a libvirt URI; gatewayd uses its own "
                               "(--libvirt-uri)")
    pool = _str(args, "pool", required=True)
    vol = _str(args, "vol", required=True)
    declared = _str(args, "format")
    if declared is None:
        raise InvalidArgument("--format is required for a pool volume (libvirt's dir pools "
                              "guess formats; the gateway pins only what the admin declares)")
    declared = register.check_format(declared)
    flags = mount_flags(args)
    fstype = register.check_fstype(args.get("fstype"))
    uri = pools.check_uri(gw.libvirt_uri or DEFAULT_URI)
    assert pool is not None and vol is not None
    async with gw.lock(name):
        found = await trio.to_thread.run_sync(pools.resolve, uri, pool, vol)
        if found.format != declared:
            raise FormatError(f"pool {pool} volume {vol}: libvirt says {found.format}, the "
                              f"admin declared {declared}; refusing to pin either")
        checked = await trio.to_thread.run_sync(lambda: register.examine(
            name, found.path, declared, read_only=arg_bool(args, "read_only"), fstype=fstype,
            allowed_roots=gw.settings.allowed_roots, forbidden=gw.own_dirs, **flags))
        volume = dataclasses.replace(checked, origin="pool", lineage={
            "layers": [], "source": found.to_json(), "params": {"format": declared}})
        gw.catalog.add_volume(volume)
    log.info("pool volume added", extra=fields(volume=name, pool=pool, vol=vol,
                                               format=declared))
    return gw.volume_json(name)
