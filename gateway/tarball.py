"""Safe extraction of a rootfs tarball into a private directory (for `mkfs.ext4 -d`).

Rules (checked on every member before anything is written):
- names are relative, without `..`, and never pass through a symlink extracted earlier (so a
  member cannot write through `etc -> /etc` onto the host);
- symlinks may point anywhere (an absolute `/bin/sh -> busybox` is normal in a rootfs; the link is
  stored, never followed); hard links must name an earlier regular member of the archive;
- character and block devices are refused (a rootfs gets /dev from libvirt-lxc at run time, and a
  device node inside an image would reach a host device); FIFOs are allowed;
- ownership is numeric (never mapped through the host's user names) and modes are kept exactly,
  setuid/setgid/sticky included.

Compression: gzip, xz and bzip2 through tarfile; zstd through the `zstd` binary (Debian package
zstd), which decompresses to a private temporary file first. Blocking: run in a worker thread.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

from gateway import command
from gateway.errors import CommandError, FormatError, InvalidArgument

Progress = Callable[[float], None]
SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar.zst", ".tar.zstd")


class ZstdError(CommandError):
    pass


def _clean(name: str) -> str:
    if name.startswith("/") or "\0" in name:
        raise FormatError(f"tarball member {name!r}: absolute paths are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"tarball member {name!r}: '..' is refused")
    return "/".join(parts)


def check_members(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The members to extract, with clean names; raises FormatError on the first unsafe one."""
    symlinks: set[str] = set()
    regular: set[str] = set()
    out = []
    for member in members:
        name = _clean(member.name)
        if not name:
            continue  # the root itself ("./")
        parents = name.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            if "/".join(parents[:i]) in symlinks:
                raise FormatError(f"tarball member {member.name!r} passes through a symlink")
        if member.ischr() or member.isblk():
            raise FormatError(f"tarball member {member.name!r} is a device node; device nodes "
                              "are refused")
        if member.islnk():
            target = _clean(member.linkname)
            if target not in regular:
                raise FormatError(f"tarball member {member.name!r}: hard link to "
                                  f"{member.linkname!r}, not an earlier file of the archive")
            member.linkname = target
        elif not (member.isreg() or member.isdir() or member.issym() or member.isfifo()):
            raise FormatError(f"tarball member {member.name!r} has an unsupported type")
        if name in symlinks and not member.issym():
            raise FormatError(f"tarball member {member.name!r} would replace a symlink")
        if member.issym():
            symlinks.add(name)
        if member.isreg():
            regular.add(name)
        member.name = name
        out.append(member)
    return out


def _open(path: Path, scratch: Path) -> tarfile.TarFile:
    if path.name.endswith((".zst", ".zstd")):
        plain = scratch / "archive.tar"
        command.run(["zstd", "-q", "-d", "-f", "-o", plain, path], timeout=1800, error=ZstdError)
        return tarfile.open(plain, "r:")
    return tarfile.open(path, "r:*")


def extract(path: Path, dest: Path, scratch: Path, *, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> int:
    """Extract the tarball at `path` into the empty directory `dest`; returns the bytes of file
    data extracted. `scratch` holds temporary files (a decompressed zstd archive)."""
    if not path.name.endswith(SUFFIXES):
        raise InvalidArgument(f"{path}: not a tarball ({', '.join(SUFFIXES)})")
    try:
        tar = _open(path, scratch)
    except (tarfile.TarError, OSError) as exc:
        raise FormatError(f"{path}: cannot read the tarball: {exc}") from exc
    done = 0
    with tar:
        try:
            members = check_members(tar.getmembers())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FormatError(f"{path}: corrupt tarball: {exc}") from exc
        total = sum(m.size for m in members if m.isreg()) or 1
        directories = []
        for member in members:
            if cancel is not None and cancel.is_set():
                raise InvalidArgument("import cancelled")
            target = posixpath.join(str(dest), member.name)
            if member.isdir():
                # Directories are made writable for extraction; their real attributes are set
                # last, deepest first (as tarfile.extractall does).
                os.makedirs(target, mode=0o700, exist_ok=True)
                directories.append(member)
                continue
            try:
                tar.extract(member, str(dest), set_attrs=True, numeric_owner=True)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise FormatError(f"{path}: cannot extract {member.name}: {exc}") from exc
            if member.isreg():
                done += member.size
                if progress is not None:
                    progress(100.0 * done / total)
        directories.sort(key=lambda m: m.name, reverse=True)
        for member in directories:
            target = posixpath.join(str(dest), member.name)
            os.chown(target, member.uid, member.gid)
            os.chmod(target, member.mode)
            os.utime(target, (member.mtime, member.mtime))
    return done
