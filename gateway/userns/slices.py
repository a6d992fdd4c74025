"""Id maps and the slice allocator (pure: no I/O).

An unprivileged domain sees ids 0..count-1; on the host they are uid_first.. and gid_first..
(`IdMap`). Slices of SLICE_SIZE ids are cut from a range gatewayd is configured with (`IdRange`):
slot k is uid_start + k*SLICE_SIZE and gid_start + k*SLICE_SIZE. `allocate` returns the lowest
slot whose uid and gid intervals touch neither a live slice nor a reserved id interval (a real
user's uid, another user's subordinate range).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import Conflict, InvalidArgument

SLICE_SIZE = 65536
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"


@dataclass(frozen=True)
class IdMap:
    """Ids 0..count-1 inside, uid_first.. and gid_first.. outside."""

    uid_first: int
    gid_first: int
    count: int = SLICE_SIZE

    def __post_init__(self) -> None:
        for what, first in (("uid", self.uid_first), ("gid", self.gid_first)):
            if first < 1 or self.count < 1 or first + self.count - 1 > MAX_ID:
                raise InvalidArgument(f"id map: {what} {first}+{self.count} is not a valid "
                                      "host range above 0")

    @property
    def uids(self) -> tuple[int, int]:
        """[first, end) of the host uids."""
        return self.uid_first, self.uid_first + self.count

    @property
    def gids(self) -> tuple[int, int]:
        return self.gid_first, self.gid_first + self.count

    def uid_map(self) -> str:
        """The line for /proc/PID/uid_map."""
        return f"0 {self.uid_first} {self.count}\n"

    def gid_map(self) -> str:
        return f"0 {self.gid_first} {self.count}\n"

    def to_json(self) -> dict[str, int]:
        return {"uid_first": self.uid_first, "gid_first": self.gid_first, "count": self.count}


@dataclass(frozen=True)
class IdRange:
    """Host ids gatewayd hands slices out of: uid_start.., gid_start.., `count` ids each."""

    uid_start: int
    gid_start: int
    count: int
    source: str = "--userns-range"  # where it came from, for messages

    @property
    def slots(self) -> int:
        return self.count // SLICE_SIZE

    def slot(self, index: int) -> IdMap:
        return IdMap(self.uid_start + index * SLICE_SIZE, self.gid_start + index * SLICE_SIZE)

    def holds(self, idmap: IdMap) -> bool:
        """Whether `idmap` lies inside the range, both for uids and gids."""
        return (self.uid_start <= idmap.uid_first
                and idmap.uid_first + idmap.count <= self.uid_start + self.count
                and self.gid_start <= idmap.gid_first
                and idmap.gid_first + idmap.count <= self.gid_start + self.count)


def parse_range(text: str, source: str = "--userns-range") -> IdRange:
    """START:COUNT (the same ids for uids and gids); COUNT holds at least one slice."""
    start_text, sep, count_text = text.strip().partition(":")
    try:
        start, count = int(start_text), int(count_text)
    except ValueError:
        start = count = -1
    if not sep or start < 1 or count < SLICE_SIZE or start + count - 1 > MAX_ID:
        raise InvalidArgument(f"{source}: expected START:COUNT with START >= 1 and COUNT >= "
                              f"{SLICE_SIZE} (one slice), not {text!r}")
    return IdRange(start, start, count, source)


Interval = tuple[int, int]  # [first, end)


def _overlaps(a: Interval, b: Interval) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def collides(idmap: IdMap, taken: Iterable[IdMap], reserved_uids: Iterable[Interval] = (),
             reserved_gids: Iterable[Interval] = ()) -> str | None:
    """What `idmap` would overlap (a live slice, a reserved interval), or None."""
    for other in taken:
        if _overlaps(idmap.uids, other.uids) or _overlaps(idmap.gids, other.gids):
            return (f"the live slice uid {other.uid_first} gid {other.gid_first} "
                    f"(+{other.count})")
    for first, end in reserved_uids:
        if _overlaps(idmap.uids, (first, end)):
            return f"host uids {first}-{end - 1}, already in use"
    for first, end in reserved_gids:
        if _overlaps(idmap.gids, (first, end)):
            return f"host gids {first}-{end - 1}, already in use"
    return None


def allocate(id_range: IdRange, taken: Iterable[IdMap], reserved_uids: Iterable[Interval] = (),
             reserved_gids: Iterable[Interval] = ()) -> IdMap:
    """The lowest free slot of `id_range`; Conflict when every slot is taken or reserved."""
    live, ruids, rgids = list(taken), list(reserved_uids), list(reserved_gids)
    for index in range(id_range.slots):
        candidate = id_range.slot(index)
        if collides(candidate, live, ruids, rgids) is None:
            return candidate
    raise Conflict(f"no free id slice left in {id_range.source} (uid {id_range.uid_start}, gid "
                   f"{id_range.gid_start}, {id_range.slots} slice(s) of {SLICE_SIZE}): stop an "
                   "unprivileged domain or widen the range")


def check_requested(id_range: IdRange, idmap: IdMap, taken: Iterable[IdMap],
                    reserved_uids: Iterable[Interval] = (),
                    reserved_gids: Iterable[Interval] = ()) -> IdMap:
    """An explicit map (a domain defined with its own <idmap>): inside the range, one slice
    long, free. Returned as is, or refused naming why."""
    if idmap.count != SLICE_SIZE:
        raise InvalidArgument(f"id map of {idmap.count} ids: unprivileged domains get "
                              f"{SLICE_SIZE} ids")
    if not id_range.holds(idmap):
        raise InvalidArgument(f"id map uid {idmap.uid_first} gid {idmap.gid_first} lies outside "
                              f"{id_range.source} (uid {id_range.uid_start}, gid "
                              f"{id_range.gid_start}, {id_range.count} ids)")
    clash = collides(idmap, taken, reserved_uids, reserved_gids)
    if clash is not None:
        raise Conflict(f"id map uid {idmap.uid_first} gid {idmap.gid_first} overlaps {clash}")
    return idmap
