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
from gateway.inspect import FORMATS, HEADER_READ, inspect_image

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


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


def resolve_image_path(raw_path: object, allowed_roots: tuple[Path, ...]) -> Path:
    """The realpath of an image, refused unless it is absolute and inside the allowed roots."""
    if not isinstance(raw_path, str) or not raw_path:
        raise InvalidArgument("an image path is required")
    if "\0" in raw_path:
        raise InvalidArgument("image path contains a NUL byte")
    if not os.path.isabs(raw_path):
        raise InvalidArgument(f"image path must be absolute: {raw_path}")
    real = Path(os.path.realpath(raw_path))
    if allowed_roots and not within(real, allowed_roots):
        shown = ":".join(str(r) for r in allowed_roots)
        where = raw_path if str(real) == raw_path else f"{raw_path} (resolves to {real})"
        raise PermissionDenied(f"{where} is outside the allowed image roots ({shown})")
    return real


def examine(name: object, raw_path: object, fmt: object, *, read_only: bool = False,
            nosuid: bool = False, noexec: bool = False,
            allowed_roots: tuple[Path, ...] = ()) -> Volume:
    """Everything `volume add` checks before the catalog is touched; returns the row to insert."""
    name = check_name(name)
    fmt = check_format(fmt)
    path = resolve_image_path(raw_path, allowed_roots)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise NotFound(f"{raw_path}: no such file") from exc
    except OSError as exc:
        raise InvalidArgument(f"{raw_path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{raw_path} is a directory, not an image")
        block_device = stat.S_ISBLK(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or block_device):
            raise InvalidArgument(f"{raw_path} is not a regular file or block device")
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
                  header=found.facts)
