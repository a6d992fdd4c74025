"""What a host does with a volume it finds fenced (gateway/ceph/leases.py decides when): tear its
data path down, forcibly, and forget its export so nothing reopens it.

Another host took the volume's writer lease and broke the image's exclusive lock, which
blocklisted this host's QSD client: the node fails every request, flushes included. So the
mount goes first (RootfsManager.drop_fenced: a forced umount, lazy, the loop device detached,
fuse2fs stopped, the attachment recorded lost, no flush), then the export (Exports.drop: no
flush; the block view's volume, gatewayd's connection and QSD's export and nodes go whatever
fails). The export is forgotten (not desired any more), so neither a QSD restart nor the next
gatewayd brings it back; a writable open takes the lease first, which stays refused while the
other host holds it.

The parts are passed in as small protocols, so this module knows nothing of how they work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from gateway.log import fields

log = logging.getLogger("gateway.ceph.fencing")


class Mounts(Protocol):
    async def drop_fenced(self, name: str) -> bool: ...


class ExportSet(Protocol):
    async def drop(self, name: str) -> None: ...


@dataclass(frozen=True)
class Fencer:
    """Tears a fenced volume's data path down (gatewayd's Leases.on_fenced)."""

    mounts: Mounts
    exports: ExportSet
    locks: Callable[[str], trio.Lock]

    async def __call__(self, name: str) -> None:
        mounted = await self.mounts.drop_fenced(name)
        async with self.locks(name):
            await self.exports.drop(name)
        log.warning("fenced volume torn down", extra=fields(volume=name, mounted=mounted))
