"""Registering a volume: name and path rules, the allowed roots, and the header check.

Blocking file I/O: the daemon calls `examine` from a worker thread.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from gateway.catalog import Volume
from gateway.errors import FormatError, InvalidArgument, NotFound, PermissionDenied
from gateway.host import imagefile
from gateway.volumes.inspect import FORMATS, HEADER_READ, inspect_image

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Filesystem types an admin may pin at registration (the kernel-mountable ones; fuse mode takes
# ext2/3/4 only).
PINNABLE_FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid volume name {name!r}: use 1-63 characters from "
                              "[a-z0-9._-], starting with a letter or digit")
    return name


def check_format(fmt: object) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r}: choose raw or qcow2")
    assert isinstance(fmt, str)
    return fmt


def within(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve_image_path(raw_path: object, allowed_roots: tuple[Path, ...],
                       forbidden: tuple[Path, ...] = ()) -> Path:
    """The realpath of an image, refused unless it is absolute and inside the allowed roots, and
    never inside `forbidden` (the gateway's run and state directories: its block view, sockets
    and catalog are no images). Blocking (realpath walks the filesystem): worker thread only."""
    if not isinstance(raw_path, str) or not raw_path:
        raise InvalidArgument("an image path is required")
    if "\0" in raw_path:
        raise InvalidArgument("image path contains a NUL byte")
    if not os.path.isabs(raw_path):
        raise InvalidArgument(f"image path must be absolute: {raw_path}")
    # Refused on the name first: resolving a path inside the block view would ask the gateway's
    # own FUSE server (the caller runs in a worker thread, so that is slow, not a deadlock).
    if within(Path(os.path.normpath(raw_path)), forbidden):
        raise PermissionDenied(f"{raw_path} is inside the gateway's own directories")
    real = Path(os.path.realpath(raw_path))
    try:
        looped = stat.S_ISLNK(os.lstat(real).st_mode)  # realpath stops at a link in a loop only
    except FileNotFoundError:
        looped = False
    except OSError as exc:
        raise InvalidArgument(f"{raw_path}: {exc.strerror}") from exc
    if looped:
        raise InvalidArgument(f"{raw_path}: Too many levels of symbolic links")
    if within(real, forbidden):
        raise PermissionDenied(f"{raw_path} (resolves to {real}) is inside the gateway's own "
                               "directories")
    if allowed_roots and not within(real, allowed_roots):
        shown = ":".join(str(r) for r in allowed_roots)
        where = raw_path if str(real) == raw_path else f"{raw_path} (resolves to {real})"
        raise PermissionDenied(f"{where} is outside the allowed image roots ({shown})")
    return real


def check_fstype(fstype: object) -> str | None:
    """An admin-pinned filesystem type (`volume add --fstype`), or None to pin at first mount."""
    if fstype is None:
        return None
    if fstype not in PINNABLE_FSTYPES:
        raise InvalidArgument(f"unknown filesystem type {fstype!r}: choose one of "
                              f"{', '.join(PINNABLE_FSTYPES)}")
    assert isinstance(fstype, str)
    return fstype


def examine(name: object, raw_path: object, fmt: object, *, read_only: bool = False,
            nosuid: bool = True, noexec: bool = False, fstype: str | None = None,
            allowed_roots: tuple[Path, ...] = (), forbidden: tuple[Path, ...] = ()) -> Volume:
    """Everything `volume add` checks before the catalog is touched; returns the row to insert."""
    name = check_name(name)
    fmt = check_format(fmt)
    path = resolve_image_path(raw_path, allowed_roots, forbidden)
    try:
        handle = imagefile.open_path(str(path))
    except NotFound as exc:
        raise NotFound(f"{raw_path}: no such file") from exc
    try:
        # The kind is checked on an O_PATH handle, before anything is really opened: opening some
        # character devices has side effects.
        st = imagefile.check_kind(handle, str(raw_path))
        block_device = stat.S_ISBLK(st.st_mode)
        fd = imagefile.reopen(handle, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidArgument(f"{raw_path}: {exc.strerror}") from exc
    finally:
        os.close(handle)
    try:
        size = os.lseek(fd, 0, os.SEEK_END) if block_device else st.st_size
        head = os.pread(fd, HEADER_READ, 0)
    except OSError as exc:
        raise InvalidArgument(f"{raw_path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        found = inspect_image(fmt, head, size)
    except FormatError as exc:
        raise FormatError(f"{raw_path}: {exc.message}") from exc
    if found.virtual_size % 512:
        raise FormatError(f"{raw_path}: size {found.virtual_size} is not a multiple of 512 bytes")
    return Volume(name=name, path=str(path), format=fmt, virtual_size=found.virtual_size,
                  read_only=read_only, block_device=block_device, nosuid=nosuid, noexec=noexec,
                  header=found.facts, fstype=fstype, file_id=(st.st_dev, st.st_ino))
