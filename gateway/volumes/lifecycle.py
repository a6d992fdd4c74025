"""Making volumes: overlays, full copies, blank filesystems and tarball imports (blocking parts).

Where files live: every image the gateway creates itself goes to STATE_DIR/volumes/ (mode 0700),
named NAME-XXXXXXXX.FMT (a random suffix, so a name can be reused after `volume rm`, which keeps the
file). That directory is the gateway's own: it is accepted whatever --allowed-roots says, because no
user-supplied path is involved; sources (bases, tarballs) must still be inside the allowed roots.
An image is built under a hidden `.partial` name and renamed into place only when complete; on any
failure every file made so far is removed.

Every function here blocks (qemu-img, mkfs, sfdisk, tar extraction): call them from worker threads.
`progress(percent)` callbacks are called from that thread; `cancel` stops long steps early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.catalog import Volume
from gateway.errors import AlreadyExists, InvalidArgument
from gateway.host import imagefile, mkfs, qemu_img
from gateway.host.imagefile import FileId
from gateway.nbd.nodes import ExportSpec
from gateway.volumes import import_worker, register, tarball

Progress = Callable[[float], None]
SIZE_RE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_SIZE = 16 << 20
MAX_SIZE = 64 << 40
XFS_MIN = 300 << 20
COPY_CHUNK = 1 << 20


def parse_size(value: object) -> int:
    """Bytes from 123, "123", "64M", "1G", "2GiB" (binary units); a multiple of 1 MiB."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := SIZE_RE.fullmatch(value.strip())):
        size = int(m.group(1)) * UNITS[m.group(2).upper()]
    else:
        raise InvalidArgument(f"invalid size {value!r}: use bytes or a number with K, M, G or T")
    if size % (1 << 20):
        raise InvalidArgument(f"size {value} is not a multiple of 1 MiB")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidArgument(f"size {value} is outside {MIN_SIZE >> 20} MiB .. 64 TiB")
    return size


def volumes_dir(state_dir: Path) -> Path:
    path = state_dir / "volumes"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def new_image_path(state_dir: Path, name: str, fmt: str) -> Path:
    path = volumes_dir(state_dir) / f"{name}-{uuid.uuid4().hex[:8]}.{fmt}"
    if path.exists():
        raise AlreadyExists(f"{path} already exists")
    return path


def layer_tree(spec: ExportSpec, filenames: list[str] | None = None) -> dict[str, Any]:
    """An export spec (with its backing chain) as a read-only qemu-img source tree; `filenames`
    (top first, from imagefile.pinned) replace the layers' paths."""
    names = filenames or [s.path for s in spec.chain()]
    backing = layer_tree(spec.backing, names[1:]) if spec.backing is not None else None
    return qemu_img.layer(names[0], spec.fmt, backing)


def chain_files(spec: ExportSpec) -> list[tuple[str, FileId | None]]:
    """Every layer's registered file, top first, for imagefile.pinned."""
    return [(s.path, s.file_id) for s in spec.chain()]


def chain_layers(spec: ExportSpec) -> list[dict[str, str]]:
    """The lineage record of a chain: name, path and pinned format of every layer, top first."""
    return [{"name": s.name, "path": s.path, "format": s.fmt} for s in spec.chain()]


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A hidden partial file next to `final`, renamed into place on success, removed on error."""
    partial = final.with_name(f".{final.name}.partial")
    try:
        yield partial
        if final.exists():
            raise AlreadyExists(f"{final} already exists")
        os.rename(partial, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def _scratch(final: Path, what: str) -> Path:
    path = final.with_name(f".{final.name}.{what}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def registered(name: str, path: Path, fmt: str, *, origin: str, lineage: dict[str, Any],
               base: str | None = None, read_only: bool = False, nosuid: bool = True,
               noexec: bool = False) -> Volume:
    """The catalog row of an image the gateway just made, checked like `volume add` (overlays
    name a backing file, which `volume add` refuses: their header is checked by qemu-img info)."""
    if base is None:
        checked = register.examine(name, str(path), fmt, read_only=read_only, nosuid=nosuid,
                                  noexec=noexec)
        return dataclasses.replace(checked, origin=origin, lineage=lineage)
    info = qemu_img.info(path, fmt)
    header = {"backing_file": info.get("backing-filename"),
              "backing_format": info.get("backing-filename-format")}
    size = info.get("virtual-size")
    assert isinstance(size, int)
    st = os.stat(path)
    return Volume(name=name, path=str(path), format=fmt, virtual_size=size, read_only=read_only,
                  nosuid=nosuid, noexec=noexec, header=header, origin=origin, base=base,
                  lineage=lineage, file_id=(st.st_dev, st.st_ino))


def build_overlay(name: str, final: Path, base: ExportSpec, size: int, *, nosuid: bool = True,
                  noexec: bool = False) -> Volume:
    """A qcow2 overlay of `size` bytes over `base` (-F with the base's pinned format, always;
    the base file is not opened)."""
    if any(layer.rbd is not None for layer in base.chain()):
        raise InvalidArgument(f"volume {base.name} is an RBD volume: overlays of it (an RBD "
                              "snapshot and clone in the cluster) are not implemented yet")
    with building(final) as partial:
        qemu_img.create(partial, "qcow2", size, backing=Path(base.path), backing_fmt=base.fmt)
    try:
        lineage = {"layers": chain_layers(base), "source": base.name,
                   "params": {"backing_format": base.fmt}}
        return registered(name, final, "qcow2", origin="overlay", lineage=lineage,
                          base=base.name, nosuid=nosuid, noexec=noexec)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def build_copy(name: str, final: Path, source: ExportSpec, fmt: str, *,
               progress: Progress | None = None, cancel: threading.Event | None = None,
               nosuid: bool = True, noexec: bool = False) -> Volume:
    """A full, independent copy of `source` (its whole chain flattened) in format `fmt`."""
    with building(final) as partial, imagefile.pinned(chain_files(source)) as files:
        qemu_img.convert(layer_tree(source, files), partial, fmt, progress=progress,
                         cancel=cancel)
    try:
        lineage = {"layers": chain_layers(source), "source": source.name,
                   "params": {"format": fmt}}
        return registered(name, final, fmt, origin="copy", lineage=lineage, nosuid=nosuid,
                          noexec=noexec)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def _copy_sparse(src: Path, dst: Path, offset: int, cancel: threading.Event | None) -> None:
    """Copy `src` into `dst` at `offset`, skipping all-zero chunks (dst is sparse)."""
    zero = bytes(COPY_CHUNK)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        position = 0
        while chunk := fin.read(COPY_CHUNK):
            if cancel is not None and cancel.is_set():
                raise InvalidArgument("cancelled")
            if chunk != zero[:len(chunk)]:
                os.pwrite(fout.fileno(), chunk, offset + position)
            position += len(chunk)
        os.fsync(fout.fileno())


def filesystem_image(partial: Path, scratch: Path, size: int, fs: str, fmt: str,
                     partitioned: bool, label: str | None, tree: Path | None,
                     progress: Progress | None = None,
                     cancel: threading.Event | None = None) -> None:
    """mkfs on a sparse raw file, optionally inside a GPT partition at 1 MiB, then qcow2."""
    raw = scratch / "disk.raw" if fmt == "qcow2" else partial
    fs_file = scratch / "fs.raw" if partitioned else raw
    fs_size = size - mkfs.GPT_START - mkfs.GPT_TAIL if partitioned else size
    with open(fs_file, "wb") as f:
        f.truncate(fs_size)
    mkfs.mkfs(fs_file, fs, label=label, tree=tree)
    if progress:
        progress(50.0 if fmt == "qcow2" or partitioned else 100.0)
    if partitioned:
        with open(raw, "wb") as f:
            f.truncate(size)
        mkfs.gpt_one_partition(raw, fs_size)
        _copy_sparse(fs_file, raw, mkfs.GPT_START, cancel)
        fs_file.unlink()
        if progress:
            progress(75.0 if fmt == "qcow2" else 100.0)
    if fmt == "qcow2":
        start = 75.0 if partitioned else 50.0

        def scaled(p: float) -> None:
            if progress:
                progress(start + (100.0 - start) * p / 100.0)
        qemu_img.convert(qemu_img.layer(str(raw), "raw"), partial, "qcow2", progress=scaled,
                         cancel=cancel)


def check_blank(size: int, fmt: str, fs: str, label: str | None) -> None:
    register.check_format(fmt)
    if fs not in mkfs.FILESYSTEMS:
        raise InvalidArgument(f"unknown filesystem {fs!r}: choose ext4 or xfs")
    if fs == "xfs" and size < XFS_MIN + 2 * mkfs.MIB:
        raise InvalidArgument("xfs needs a volume of at least 302 MiB")
    mkfs.check_label(label)


def build_blank(name: str, final: Path, size: int, fmt: str, fs: str, *,
                label: str | None = None, partitioned: bool = False,
                progress: Progress | None = None,
                cancel: threading.Event | None = None, nosuid: bool = True,
                noexec: bool = False) -> Volume:
    check_blank(size, fmt, fs, label)
    scratch = _scratch(final, "work")
    try:
        with building(final) as partial:
            filesystem_image(partial, scratch, size, fs, fmt, partitioned, label, None,
                              progress, cancel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        lineage: dict[str, Any] = {"layers": [], "source": None,
                   "params": {"size": size, "format": fmt, "mkfs": fs, "label": label,
                              "partitioned": partitioned,
                              "partition_start": mkfs.GPT_START if partitioned else None}}
        return registered(name, final, fmt, origin="blank", lineage=lineage, nosuid=nosuid,
                          noexec=noexec)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def _image_from_filesystem(partial: Path, scratch: Path, fs_file: Path, size: int, fmt: str,
                           partitioned: bool, progress: Progress,
                           cancel: threading.Event | None) -> None:
    """The volume image around the finished filesystem `fs_file` (in `scratch`): the file itself,
    or placed in a GPT partition at 1 MiB, then converted to qcow2 if asked."""
    if not partitioned and fmt == "raw":
        os.rename(fs_file, partial)
        progress(100.0)
        return
    raw = fs_file
    if partitioned:
        raw = scratch / "disk.raw" if fmt == "qcow2" else partial
        with open(raw, "wb") as f:
            f.truncate(size)
        mkfs.gpt_one_partition(raw, size - mkfs.GPT_START - mkfs.GPT_TAIL)
        _copy_sparse(fs_file, raw, mkfs.GPT_START, cancel)
        fs_file.unlink()
        progress(50.0)
    if fmt == "qcow2":
        start = 50.0 if partitioned else 0.0
        qemu_img.convert(qemu_img.layer(str(raw), "raw"), partial, "qcow2",
                         progress=lambda p: progress(start + (100.0 - start) * p / 100.0),
                         cancel=cancel)
    progress(100.0)


def build_import(name: str, final: Path, source: Path, size: int, fmt: str, *,
                 label: str | None = None, partitioned: bool = False,
                 progress: Progress | None = None,
                 cancel: threading.Event | None = None,
                 max_members: int = tarball.MAX_MEMBERS) -> Volume:
    """An ext4 rootfs made from a tarball with `mkfs.ext4 -d` (nothing is mounted). Extraction
    and mkfs run in an unprivileged user namespace (gateway.volumes.import_worker), never as root
    on the host; the tarball may hold at most `size` bytes (see gateway.volumes.tarball) and
    `max_members`."""

    check_blank(size, fmt, "ext4", label)
    fs_size = size - mkfs.GPT_START - mkfs.GPT_TAIL if partitioned else size

    def scaled(low: float, high: float) -> Progress:
        def report(p: float) -> None:
            if progress:
                progress(low + (high - low) * p / 100.0)
        return report

    scratch = _scratch(final, "work")
    try:
        built = import_worker.build_filesystem(
            source, scratch, fs_size, import_worker.Options(size, max_members, label),
            progress=scaled(0.0, 60.0), cancel=cancel)
        with building(final) as partial:
            _image_from_filesystem(partial, scratch, scratch / import_worker.FS_FILE, size, fmt,
                                   partitioned, scaled(60.0, 100.0), cancel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        lineage = {"layers": [], "source": str(source),
                   "params": {"size": size, "format": fmt, "mkfs": "ext4", "label": label,
                              "partitioned": partitioned, "bytes": built.data_bytes,
                              "members": built.members}}
        return registered(name, final, fmt, origin="import", lineage=lineage)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
