"""Checking and extracting a rootfs tarball, member by member, for `mkfs.ext4 -d`.

Rules (`check_members`: each member is checked, in archive order, before anything of it is
written, so a stream is refused at the first bad member and nothing after it is read):
- names are relative, without `..`, and each name (after cleaning `./` and `//`) appears once: a
  second entry with the same name is refused whatever its type, so extraction never replaces or
  writes through anything it made before;
- no member's path passes through an earlier member that is not a directory (a symlink such as
  `etc -> /etc`, a hard link, a file or a FIFO);
- symlinks may point anywhere (an absolute `/bin/sh -> busybox` is normal in a rootfs; the link is
  stored, never followed); a hard link must name an earlier regular-file member (names are unique,
  so that name was never a symlink, a directory or another hard link);
- character and block devices are refused (a rootfs gets /dev from libvirt-lxc at run time, and a
  device node inside an image would reach a host device); FIFOs are allowed; any other type is
  refused;
- ownership is numeric (never mapped through user names), below 65536 (the ids of the import
  namespace, see below); modes are kept exactly, setuid/setgid/sticky included;
- at most MAX_MEMBERS members, and the running total of the members (each counted as its data
  rounded up to 4 KiB plus 4 KiB for its inode and directory entry; implied parent directories
  count too) never exceeds the volume size: a compressed bomb is refused at its first member
  header that crosses the size, after writing at most about the volume size.
Extraction (`extract`) creates every file with O_CREAT|O_EXCL|O_NOFOLLOW and sets owners, modes and
times on what it just created; directories get their attributes last, deepest first. The `./`
root entry's attributes are ignored: the image root is 0755, owned by 0:0.

Where this runs: never as root on the host. gateway.volumes.import_worker runs `extract` and then
`mkfs.ext4 -d` in a worker process inside a new user namespace whose ids 0..65535 are host ids
import_worker.ID_BASE..+65535 (0x7FFF0000..). Inside, the worker is root and can chown to any id
an image needs and set setuid bits; on the host it is an ordinary unprivileged uid that owns
nothing but the scratch directory it works in (reached through its working directory; the state
directory above it is 0700 root). A rule missed here therefore cannot write, chown or chmod a host
file. Trade-offs: the host id range is fixed and shared by concurrent imports (the workers could
reach each other's scratch only if one of them ran attacker-chosen code); the kernel must allow
user namespaces (there is no fallback to extraction as root: the import fails with a clear error);
mkfs.ext4 records the in-namespace ids, which are exactly the archive's. Compression: gzip, xz and
bzip2 through tarfile's stream mode; zstd through a `zstd -d -c` child (Debian package zstd)
inside the namespace, streaming (no temporary file).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gateway.errors import FormatError, InvalidArgument

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar.zst", ".tar.zstd")
ZSTD_SUFFIXES = (".zst", ".zstd")
MAX_MEMBERS = 200_000
ID_COUNT = 65536  # uids and gids inside the image: 0..65535
BLOCK = 4096
COPY_CHUNK = 1 << 20
ROOT_MODE = 0o755
KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.FIFOTYPE: "a FIFO"}


def check_suffix(name: str) -> bool:
    """Whether `name` is a zstd tarball; InvalidArgument unless it has a tarball suffix."""
    if not name.endswith(SUFFIXES):
        raise InvalidArgument(f"{name}: not a tarball ({', '.join(SUFFIXES)})")
    return name.endswith(ZSTD_SUFFIXES)


def _clean(name: str, member: str) -> str:
    if name.startswith("/") or "\0" in name:
        raise FormatError(f"tarball member {member!r}: absolute paths are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"tarball member {member!r}: '..' is refused")
    return "/".join(parts)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "a directory"
    if member.isreg():
        return "a regular file"
    return KINDS.get(member.type, "an unsupported member")


class MemberChecker:
    """The rules above, applied one member at a time, in archive order."""

    def __init__(self, max_bytes: int | None = None, max_members: int = MAX_MEMBERS) -> None:
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.members = 0
        self.total = 0  # bytes charged against max_bytes
        self.kinds: dict[str, str] = {}  # clean name -> _kind(), or "implied" for a parent dir

    def check(self, member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """The member with its clean name (None for the root entry); FormatError if unsafe."""
        self.members += 1
        if self.members > self.max_members:
            raise FormatError(f"tarball has more than {self.max_members} members")
        name = _clean(member.name, member.name)
        if not name:
            if not member.isdir():
                raise FormatError(f"tarball member {member.name!r}: the root is not a directory")
            return None
        implied = self._parents(member, name)
        self._check_type(member, name)
        self._check_owner(member)
        self._charge(member, len(implied))
        for parent in implied:
            self.kinds[parent] = "implied"
        self.kinds[name] = _kind(member)
        member.name = name
        return member

    def _parents(self, member: tarfile.TarInfo, name: str) -> list[str]:
        """The parent directories `name` implies (not seen yet); refuses a non-directory one."""
        implied = []
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            kind = self.kinds.get(parent)
            if kind is None:
                implied.append(parent)
            elif kind not in ("a directory", "implied"):
                raise FormatError(f"tarball member {member.name!r} passes through {parent!r}, "
                                  f"which is {kind}")
        return implied

    def _check_type(self, member: tarfile.TarInfo, name: str) -> None:
        seen = self.kinds.get(name)
        if seen is not None and not (seen == "implied" and member.isdir()):
            raise FormatError(f"tarball member {member.name!r} appears twice")
        if member.ischr() or member.isblk():
            raise FormatError(f"tarball member {member.name!r} is a device node; device nodes "
                              "are refused")
        if member.islnk():
            target = _clean(member.linkname, member.name)
            if self.kinds.get(target) != "a regular file":
                raise FormatError(f"tarball member {member.name!r}: hard link to "
                                  f"{member.linkname!r}, not an earlier regular file of the "
                                  "archive")
            member.linkname = target
        elif not (member.isreg() or member.isdir() or member.issym() or member.isfifo()):
            raise FormatError(f"tarball member {member.name!r} has an unsupported type")

    def _check_owner(self, member: tarfile.TarInfo) -> None:
        if not (0 <= member.uid < ID_COUNT and 0 <= member.gid < ID_COUNT):
            raise FormatError(f"tarball member {member.name!r}: owner {member.uid}:{member.gid} "
                              f"is outside 0..{ID_COUNT - 1}")

    def _charge(self, member: tarfile.TarInfo, implied: int) -> None:
        data = member.size if member.isreg() else 0
        if member.issym():
            data = len(member.linkname.encode("utf-8", "surrogateescape"))
        self.total += (1 + implied) * BLOCK + _round_up(data)
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise FormatError(f"tarball contents exceed the volume size ({_mib(self.max_bytes)}) "
                              f"at member {member.name!r}")


def check_members(members: Iterable[tarfile.TarInfo], *, max_bytes: int | None = None,
                  max_members: int = MAX_MEMBERS) -> Iterator[tarfile.TarInfo]:
    """The members to extract, with clean names, one at a time (a stream is read no further than
    the member being checked); raises FormatError at the first unsafe one."""
    checker = MemberChecker(max_bytes, max_members)
    for member in members:
        checked = checker.check(member)
        if checked is not None:
            yield checked


@dataclass(frozen=True)
class Extracted:
    data_bytes: int  # file data written
    members: int  # members extracted (the root entry excluded)


def _set_attrs(fd: int, member: tarfile.TarInfo) -> None:
    os.fchown(fd, member.uid, member.gid)  # before chmod: chown clears setuid bits
    os.fchmod(fd, member.mode & 0o7777)
    os.utime(fd, (member.mtime, member.mtime))


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        source = tar.extractfile(member)
        if source is not None:
            with source:
                shutil.copyfileobj(source, out, COPY_CHUNK)
        out.flush()
        _set_attrs(out.fileno(), member)


def _make_fifo(member: tarfile.TarInfo, path: str) -> None:
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _set_attrs(fd, member)
    finally:
        os.close(fd)


def _make_symlink(member: tarfile.TarInfo, path: str) -> None:
    os.symlink(member.linkname, path)
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str) -> None:
    path = os.path.join(dest, member.name)
    os.makedirs(os.path.dirname(path), mode=ROOT_MODE, exist_ok=True)
    if member.isdir():
        os.makedirs(path, mode=0o700, exist_ok=True)  # exists already if it was implied
    elif member.isreg():
        _write_file(tar, member, path)
    elif member.issym():
        _make_symlink(member, path)
    elif member.islnk():
        os.link(os.path.join(dest, member.linkname), path, follow_symlinks=False)
    else:
        _make_fifo(member, path)


def _finish_directories(directories: list[tarfile.TarInfo], dest: str) -> None:
    for member in sorted(directories, key=lambda m: m.name, reverse=True):
        fd = os.open(os.path.join(dest, member.name),
                     os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _set_attrs(fd, member)
        finally:
            os.close(fd)


def extract(tar: tarfile.TarFile, dest: str, *, max_bytes: int | None = None,
            max_members: int = MAX_MEMBERS) -> Extracted:
    """Check and extract the members of `tar` (a stream is fine) into the empty directory `dest`.
    Raises FormatError for an unsafe member or an unreadable archive. Run it only inside the
    import namespace (gateway.volumes.import_worker), never as root on the host."""
    directories: list[tarfile.TarInfo] = []
    data = count = 0
    name = "(header)"
    try:
        for member in check_members(tar, max_bytes=max_bytes, max_members=max_members):
            name = member.name
            _extract_one(tar, member, dest)
            count += 1
            if member.isdir():
                directories.append(member)
            elif member.isreg():
                data += member.size
        name = "(directories)"
        _finish_directories(directories, dest)
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:
        raise FormatError(f"corrupt tarball near member {name!r}: {exc}") from exc
    except OSError as exc:
        raise FormatError(f"cannot extract tarball member {name!r}: "
                          f"{exc.strerror or exc}") from exc
    return Extracted(data, count)
