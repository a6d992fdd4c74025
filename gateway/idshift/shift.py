"""The id shift of a user-namespace rootfs in fuse mode (pure: no I/O).

On disk a file carries ids 0..count-1 as the container sees them; on the host (and so, through
the container's user namespace, inside it) the layer shows them as uid_first.. and gid_first..
Ids on disk beyond the slice show as the overflow id (nobody), as the kernel shows ids a user
namespace does not map. A host id outside the slice has no disk id: it cannot own what it
creates (EOVERFLOW, as on an idmapped mount) nor be given a file (EINVAL, as chown(2) says for an
id the caller's namespace does not map).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid's default: "nobody"


class Unmapped(Exception):
    """A host id outside the slice; `.errno` is what the FUSE request answers."""

    def __init__(self, what: str, host_id: int, err: int) -> None:
        super().__init__(f"{what} {host_id} lies outside the slice")
        self.errno = err


@dataclass(frozen=True)
class Shift:
    uid_first: int
    gid_first: int
    count: int

    def __post_init__(self) -> None:
        if self.uid_first < 1 or self.gid_first < 1 or not 0 < self.count <= 2**32 - 2:
            raise ValueError(f"bad id shift uid {self.uid_first} gid {self.gid_first} "
                             f"count {self.count}")

    @staticmethod
    def _up(disk: int, first: int, count: int) -> int:
        return first + disk if 0 <= disk < count else OVERFLOW_ID

    @staticmethod
    def _down(host: int, first: int, count: int, what: str, err: int) -> int:
        if first <= host < first + count:
            return host - first
        raise Unmapped(what, host, err)

    def host_uid(self, disk: int) -> int:
        return self._up(disk, self.uid_first, self.count)

    def host_gid(self, disk: int) -> int:
        return self._up(disk, self.gid_first, self.count)

    def owner_uid(self, host: int) -> int:
        """The disk uid of a file a caller with host uid `host` creates."""
        return self._down(host, self.uid_first, self.count, "uid", errno.EOVERFLOW)

    def owner_gid(self, host: int) -> int:
        return self._down(host, self.gid_first, self.count, "gid", errno.EOVERFLOW)

    def chown_uid(self, host: int) -> int:
        """The disk uid for chown to host uid `host`."""
        return self._down(host, self.uid_first, self.count, "uid", errno.EINVAL)

    def chown_gid(self, host: int) -> int:
        return self._down(host, self.gid_first, self.count, "gid", errno.EINVAL)
