"""FIFREEZE / FITHAW: hold a mounted filesystem still for the instant a snapshot is taken.

`freeze(path)` writes every dirty page of the filesystem mounted at `path` to its block device
and blocks new writes (they wait in the kernel, the writer sees a stall, never an error) until
`thaw`. The block device under a gateway kernel mount is a loop device over the block view, so
the freeze's writes go through the gateway's own FUSE server: call both from a worker thread,
never from the trio thread that serves the block view.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from gateway.errors import BackendError, Conflict

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


@dataclass
class Frozen:
    """A frozen filesystem; `thaw()` lets it go (idempotent)."""

    path: str
    fd: int

    def thaw(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not frozen (any more)
                raise BackendError(f"thaw {self.path}: {exc.strerror}") from exc
        finally:
            os.close(fd)


def freeze(path: str | os.PathLike[str]) -> Frozen:
    """Freeze the filesystem mounted at `path` (its root directory)."""
    shown = os.fspath(path)
    fd = os.open(shown, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise Conflict(f"freeze {shown}: already frozen") from exc
        raise BackendError(f"freeze {shown}: {exc.strerror}") from exc
    return Frozen(shown, fd)
