"""`volume save`: the output file of a volume written out as an image for another system.

The file is made by gatewayd itself, never by a tool following a name: its directory is resolved
and must lie inside the allowed roots (and outside the gateway's own directories). The image is
written into a hidden partial file created there with O_CREAT|O_EXCL|O_NOFOLLOW relative to that
directory's fd, so a symlink or a file swapped in cannot be written through. The image format is
written by `qemu-img create -f FMT` on the created file (through /proc/<gatewayd>/fd/N), the copy
then goes into it from QSD, and the result is checked by the gateway's own header inspector.
Only then is it published under its name: linked (which never replaces anything), or, with
`force`, renamed over an existing regular file, so a failed save leaves the old file as it was.
On any failure the partial file is removed. Blocking: worker threads only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import AlreadyExists, FormatError, InvalidArgument, PermissionDenied
from gateway.host import imagefile, qemu_img
from gateway.volumes.inspect import HEADER_READ, inspect_image
from gateway.volumes.register import within


@dataclass
class OutputFile:
    """An output image being written: its directory fd, its final path, the hidden partial name
    it is written under, and an fd on the partial file itself."""

    path: Path
    dir_fd: int
    fd: int
    partial: str
    force: bool
    published: bool = False

    @property
    def proc_path(self) -> str:
        return imagefile.proc_path(self.fd)

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.dir_fd = -1

    def _ours(self, name: str) -> bool:
        try:
            ours = os.fstat(self.fd)
            there = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)

    def remove(self) -> None:
        """Unlink the partial file (by name in its directory, only if it is still ours) and
        close; a published file stays."""
        if self.dir_fd >= 0 and self.fd >= 0 and self._ours(self.partial):
            with contextlib.suppress(OSError):
                os.unlink(self.partial, dir_fd=self.dir_fd)
        self.close()

    def publish(self) -> None:
        """Give the checked image its name: a hard link (never replaces a file that appeared
        meanwhile) or, with force, a rename over an existing regular file."""
        name = self.path.name
        os.fsync(self.fd)
        if self.force:
            try:
                existing = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                raise InvalidArgument(f"{self.path} exists and is not a regular file; "
                                      "not replacing it")
            os.rename(self.partial, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            try:
                os.link(self.partial, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except FileExistsError as exc:
                raise AlreadyExists(f"{self.path} appeared while it was being written; use "
                                    "--force to replace it") from exc
            os.unlink(self.partial, dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        self.published = True


def create_output(raw_path: object, *, allowed_roots: tuple[Path, ...],
                  forbidden: tuple[Path, ...], force: bool) -> OutputFile:
    """Check the output path and create the partial file (mode 0600) for `volume save`."""
    if not isinstance(raw_path, str) or not raw_path or "\0" in raw_path:
        raise InvalidArgument("an output file path is required")
    if not os.path.isabs(raw_path):
        raise InvalidArgument(f"output path must be absolute: {raw_path}")
    name = os.path.basename(raw_path)
    if name in ("", ".", ".."):
        raise InvalidArgument(f"output path {raw_path} names no file")
    if within(Path(os.path.normpath(raw_path)), forbidden):
        raise PermissionDenied(f"{raw_path} is inside the gateway's own directories")
    directory = Path(os.path.realpath(os.path.dirname(raw_path)))
    path = directory / name
    if within(path, forbidden):
        raise PermissionDenied(f"{raw_path} is inside the gateway's own directories")
    if allowed_roots and not within(path, allowed_roots):
        shown = ":".join(str(r) for r in allowed_roots)
        raise PermissionDenied(f"{raw_path} is outside the allowed image roots ({shown})")
    handle = imagefile.open_path(str(directory))  # no symlink anywhere on the way
    try:
        dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=handle)
    except NotADirectoryError as exc:
        raise InvalidArgument(f"{directory} is not a directory") from exc
    except OSError as exc:
        raise InvalidArgument(f"{directory}: {exc.strerror}") from exc
    finally:
        os.close(handle)
    try:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not force:
                raise AlreadyExists(f"{raw_path} exists; use --force to replace it")
            if not stat.S_ISREG(existing.st_mode):
                raise InvalidArgument(f"{raw_path} exists and is not a regular file; "
                                      "not replacing it")
        partial = f".{name[:200]}.{uuid.uuid4().hex[:8]}.partial"
        flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC
        try:
            fd = os.open(partial, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise InvalidArgument(f"cannot create a file in {directory}: {exc.strerror}") \
                from exc
    except BaseException:
        os.close(dir_fd)
        raise
    return OutputFile(path, dir_fd, fd, partial, force)


def format_output(out: OutputFile, fmt: str, size: int) -> None:
    """Write an empty image of `fmt` and `size` into the created file."""
    qemu_img.create(Path(out.proc_path), fmt, size)


def check_output(out: OutputFile, fmt: str, size: int) -> int:
    """The gateway's own header inspector on what was written: the declared format, the volume's
    size, and (for qcow2) no backing file, data file or encryption. Returns the file's size."""
    head = os.pread(out.fd, HEADER_READ, 0)
    file_size = os.fstat(out.fd).st_size
    try:
        found = inspect_image(fmt, head, file_size)
    except FormatError as exc:
        raise FormatError(f"{out.path}: the written image fails the check: {exc.message}") from exc
    if found.virtual_size != size:
        raise FormatError(f"{out.path}: the written image is {found.virtual_size} bytes, "
                          f"not {size}")
    return file_size
