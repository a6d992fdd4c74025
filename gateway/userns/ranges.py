"""Where unprivileged domains' ids come from, read from the host (blocking: /etc files).

The range is gatewayd's `--userns-range START:COUNT` (env GATEWAY_USERNS_RANGE) or, without one,
the /etc/subuid and /etc/subgid entries of the dedicated system user DEFAULT_USER. Slices never
cover a uid or gid the host's users and groups have, nor another user's subordinate range.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import InvalidArgument
from gateway.userns.slices import SLICE_SIZE, IdRange, Interval

DEFAULT_USER = "storage-gateway"
SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


@dataclass(frozen=True)
class HostIds:
    """The ids slices must stay clear of."""

    uids: tuple[Interval, ...] = ()
    gids: tuple[Interval, ...] = ()


@dataclass(frozen=True)
class SubordinateEntry:
    owner: str
    start: int
    count: int


@dataclass
class Subordinates:
    uid: list[SubordinateEntry] = field(default_factory=list)
    gid: list[SubordinateEntry] = field(default_factory=list)


def parse_subordinate(text: str) -> list[SubordinateEntry]:
    """Lines NAME:START:COUNT of /etc/subuid or /etc/subgid; malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or line.lstrip().startswith("#"):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            out.append(SubordinateEntry(parts[0], start, count))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc


def subordinates(subuid: Path = SUBUID, subgid: Path = SUBGID) -> Subordinates:
    return Subordinates(parse_subordinate(_read(subuid)), parse_subordinate(_read(subgid)))


def _names(user: str) -> set[str]:
    """The names an entry of `user` may carry: the name and the uid in decimal."""
    try:
        return {user, str(pwd.getpwnam(user).pw_uid)}
    except KeyError:
        return {user}


def default_range(subs: Subordinates, user: str = DEFAULT_USER) -> IdRange | None:
    """The first /etc/subuid and /etc/subgid entries of `user`, as a range of the shorter
    count; None when it has either entry missing."""
    names = _names(user)
    uid = next((e for e in subs.uid if e.owner in names), None)
    gid = next((e for e in subs.gid if e.owner in names), None)
    if uid is None or gid is None:
        return None
    count = min(uid.count, gid.count)
    if count < SLICE_SIZE:
        raise InvalidArgument(f"the /etc/subuid or /etc/subgid entry of {user} holds fewer "
                              f"than {SLICE_SIZE} ids")
    return IdRange(uid.start, gid.start, count, f"the /etc/subuid and /etc/subgid of {user}")


def resolve(configured: IdRange | None, subs: Subordinates,
            user: str = DEFAULT_USER) -> IdRange:
    """The range unprivileged domains use, or a one-line refusal saying how to get one."""
    found = configured or default_range(subs, user)
    if found is None:
        raise InvalidArgument(f"--userns needs an id range: start gatewayd with --userns-range "
                              f"START:COUNT (env GATEWAY_USERNS_RANGE) or give the system user "
                              f"{user} entries in /etc/subuid and /etc/subgid")
    return found


def host_ids(subs: Subordinates, user: str = DEFAULT_USER) -> HostIds:
    """Every uid and gid of the host's users and groups, and the subordinate ranges of users
    other than `user` (whose own entry is the range)."""
    names = _names(user)
    uids = {(p.pw_uid, p.pw_uid + 1) for p in pwd.getpwall()}
    gids = {(g.gr_gid, g.gr_gid + 1) for g in grp.getgrall()}
    gids |= {(p.pw_gid, p.pw_gid + 1) for p in pwd.getpwall()}
    uids |= {(e.start, e.start + e.count) for e in subs.uid if e.owner not in names}
    gids |= {(e.start, e.start + e.count) for e in subs.gid if e.owner not in names}
    return HostIds(tuple(sorted(uids)), tuple(sorted(gids)))


@dataclass(frozen=True)
class Source:
    """What a slice is cut with: the range and the ids to stay clear of."""

    id_range: IdRange
    reserved: HostIds


def load(configured: IdRange | None, user: str = DEFAULT_USER, *, subuid: Path = SUBUID,
         subgid: Path = SUBGID) -> Source:
    """Blocking: reads /etc/subuid, /etc/subgid, the passwd and group databases."""
    subs = subordinates(subuid, subgid)
    return Source(resolve(configured, subs, user), host_ids(subs, user))
