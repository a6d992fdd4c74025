"""A tenant's own subordinate ids: the /etc/subuid and /etc/subgid entries of its user, which
its --userns attachments take their slices from (never gatewayd's range). Blocking (/etc files,
the passwd and group databases)."""

from __future__ import annotations

from pathlib import Path

from gateway.tenants.rights import no_subids
from gateway.userns import ranges
from gateway.userns.slices import IdRange


def own_range(user: str, *, subuid: Path = ranges.SUBUID,
              subgid: Path = ranges.SUBGID) -> IdRange | None:
    """The tenant's first /etc/subuid and /etc/subgid entries as a range (None: it has none)."""
    return ranges.default_range(ranges.subordinates(subuid, subgid), user)


def load(user: str, *, subuid: Path = ranges.SUBUID, subgid: Path = ranges.SUBGID) -> ranges.Source:
    """What the tenant's slices are cut with; Forbidden (no-subids) when it has no range."""
    subs = ranges.subordinates(subuid, subgid)
    found = ranges.default_range(subs, user)
    if found is None:
        raise no_subids(user).error()
    return ranges.Source(found, ranges.host_ids(subs, user))
