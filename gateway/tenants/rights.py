"""Who may call which admin op, with which arguments: one table, no I/O.

Root and the admin group are ADMIN callers and may call every op. TENANT callers (members of
gatewayd's tenant group) may call only the ops of TENANT_RULES, each with its per-op rule:
which arguments must name a volume the tenant owns or one the admin published, which values
the request must carry (`userns: true`), which arguments it may not give at all (host paths,
explicit id maps, copies), whether the tenant needs its own subordinate ids, and how the answer
is cut down for a tenant (only its own volumes, the basic status). Every other op is refused.

`check` decides from the request's (already validated) arguments and the `Facts` the
dispatcher read beforehand; `shape` trims an answer. A refusal carries a short reason word,
which metrics count (gateway_refusals{reason}).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import Forbidden


class Role(enum.Enum):
    ADMIN = "admin"
    TENANT = "tenant"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the peer's uid, its user name and its role."""

    role: Role
    uid: int
    user: str

    @property
    def tenant(self) -> bool:
        return self.role is Role.TENANT


ROOT = Caller(Role.ADMIN, 0, "root")  # gatewayd's own callers (the hook, tools, tests)


class Shape(enum.Enum):
    WHOLE = "whole"  # the answer as it is
    OWNED = "owned"  # a list of volumes: only the caller's own
    BASIC = "basic"  # status: protocol, version, health and who the caller is


# Refusal reasons (the label of gateway_refusals).
ADMIN_ONLY = "admin-only"
HOST_PATH = "host-path"
NOT_OWNER = "not-owner"
UNPUBLISHED = "unpublished"
NEEDS_USERNS = "needs-userns"
NO_SUBIDS = "no-subids"
OVERLAY_ONLY = "overlay-only"
REASONS = (ADMIN_ONLY, HOST_PATH, NOT_OWNER, UNPUBLISHED, NEEDS_USERNS, NO_SUBIDS, OVERLAY_ONLY)


ANY = object()  # Required.value: the argument must be given, whatever its value


@dataclass(frozen=True)
class Required:
    """An argument a tenant's request must carry with `value` (ANY: given at all), else
    refused with `reason`."""

    key: str
    value: object
    reason: str
    message: str


@dataclass(frozen=True)
class Barred:
    """An argument a tenant may not give (any value other than absent, null or false)."""

    key: str
    reason: str
    message: str


@dataclass(frozen=True)
class TenantRule:
    owned: tuple[str, ...] = ()  # argument keys naming volumes the tenant must own
    published: tuple[str, ...] = ()  # argument keys naming volumes the admin published
    # an argument naming a domain: `own_domain` says the domain must exist and run on one of the
    # tenant's volumes; otherwise a domain that exists must (a new name is free to take)
    domain: str | None = None
    own_domain: bool = False
    required: tuple[Required, ...] = ()
    barred: tuple[Barred, ...] = ()
    subids: bool = False  # the tenant needs /etc/subuid and /etc/subgid entries of its own
    shape: Shape = Shape.WHOLE


USERNS = Required("userns", True, NEEDS_USERNS,
                  "tenants mount volumes and start domains only in a user namespace: add "
                  "--userns")
NO_IDMAP = Barred("idmap", ADMIN_ONLY, "an explicit id map needs the admin right")
OVERLAY_ONLY_MESSAGE = ("tenants create only overlays of published volumes: volume create NEW "
                        "--from BASE --overlay (no --copy, --size, --mkfs, --label, "
                        "--partitioned)")
BARRED_CREATE = (
    *(Barred(key, OVERLAY_ONLY, OVERLAY_ONLY_MESSAGE)
      for key in ("copy", "size", "mkfs", "label", "partitioned")),
    Barred("setuid", ADMIN_ONLY, "honouring setuid binaries (--setuid) needs the admin right"),
)

TENANT_RULES: dict[str, TenantRule] = {
    "status": TenantRule(shape=Shape.BASIC),
    "volume-list": TenantRule(shape=Shape.OWNED),
    "volume-show": TenantRule(owned=("name",)),
    "volume-remove": TenantRule(owned=("name",)),
    "volume-create": TenantRule(
        published=("from",), barred=BARRED_CREATE,
        required=(Required("from", ANY, OVERLAY_ONLY,
                           "tenants create only overlays of published volumes: volume create "
                           "NEW --from BASE --overlay"),
                  Required("overlay", True, OVERLAY_ONLY,
                           "tenants create only overlays of published volumes: add --overlay"))),
    "mount": TenantRule(owned=("name",), required=(USERNS,), barred=(NO_IDMAP,), subids=True),
    "umount": TenantRule(owned=("name",), barred=(
        Barred("if_unused", ADMIN_ONLY, "if_unused is the libvirt hook's, an admin right"),
        Barred("domain", ADMIN_ONLY, "domain is the libvirt hook's, an admin right"))),
    "domain-start": TenantRule(owned=("volume",), domain="name", required=(USERNS,),
                               subids=True),
    "domain-stop": TenantRule(domain="name", own_domain=True),
}

# Admin-only ops that name host storage (a file, a libvirt pool, an RBD image): refused with
# their own reason.
HOST_PATH_OPS = frozenset({"volume-add", "volume-import", "volume-save", "volume-add-pool",
                           "volume-add-rbd"})


@dataclass(frozen=True)
class Facts:
    """What the rules look at besides the request, read by the dispatcher before `check`."""

    owners: Mapping[str, int | None] = field(default_factory=dict)  # volume -> owner (None: admin)
    published: frozenset[str] = frozenset()
    domains: Mapping[str, str] = field(default_factory=dict)  # gateway domain -> its volume
    subids: bool = False  # the caller has /etc/subuid and /etc/subgid entries of its own


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str

    def error(self) -> Forbidden:
        err = Forbidden(self.message)
        err.reason = self.reason
        return err


def rule_for(caller: Caller, op: str) -> TenantRule | None:
    """The tenant rule of `op` (None: every request of an admin caller, or no rule at all)."""
    return TENANT_RULES.get(op) if caller.tenant else None


def needs_subids(caller: Caller, op: str) -> bool:
    rule = rule_for(caller, op)
    return rule is not None and rule.subids


def needs_domains(caller: Caller, op: str) -> bool:
    rule = rule_for(caller, op)
    return rule is not None and rule.domain is not None


def _given(args: Mapping[str, object], key: str) -> bool:
    value = args.get(key)
    return value is not None and value is not False


def check(caller: Caller, op: str, args: Mapping[str, object], facts: Facts) -> Refusal | None:
    """None when `caller` may send `op` with `args`, else why not."""
    if not caller.tenant:
        return None
    who = f"user {caller.user} is a tenant"
    rule = TENANT_RULES.get(op)
    if rule is None:
        if op in HOST_PATH_OPS:
            return Refusal(HOST_PATH, f"{who}: {op} names host storage (a path, a pool or an "
                                      "RBD image), which needs the admin right")
        return Refusal(ADMIN_ONLY, f"{who}: {op} needs the admin right")
    for barred in rule.barred:
        if _given(args, barred.key):
            return Refusal(barred.reason, f"{who}: {barred.message}")
    for required in rule.required:
        value = args.get(required.key)
        present = value is not None if required.value is ANY else value == required.value
        if not present:
            return Refusal(required.reason, f"{who}: {required.message}")
    for key in rule.owned:
        name = args.get(key)
        if not isinstance(name, str) or name not in facts.owners or \
                facts.owners[name] != caller.uid:
            return Refusal(NOT_OWNER, f"{who}: user {caller.user} owns no volume named {name}")
    for key in rule.published:
        name = args.get(key)
        if not isinstance(name, str) or name not in facts.published:
            return Refusal(UNPUBLISHED, f"{who}: volume {name} is not published for tenants "
                                        f"(the admin publishes it: volume publish {name})")
    if rule.domain is not None:
        domain = args.get(rule.domain)
        volume = facts.domains.get(domain) if isinstance(domain, str) else None
        mine = volume is not None and facts.owners.get(volume, None) == caller.uid
        if (rule.own_domain and not mine) or (volume is not None and not mine):
            return Refusal(NOT_OWNER, f"{who}: user {caller.user} has no domain named {domain}")
    if rule.subids and not facts.subids:
        return no_subids(caller.user)
    return None


def no_subids(user: str) -> Refusal:
    """A tenant without subordinate ids of its own."""
    return Refusal(NO_SUBIDS, f"user {user} is a tenant with no entries in /etc/subuid and "
                              "/etc/subgid, which a tenant's --userns containers take their ids "
                              "from (the admin adds them: usermod --add-subuids FIRST-LAST "
                              f"--add-subgids FIRST-LAST {user})")


def enforce(caller: Caller, op: str, args: Mapping[str, object], facts: Facts) -> None:
    """`check`, raising the refusal as a Forbidden error."""
    refusal = check(caller, op, args, facts)
    if refusal is not None:
        raise refusal.error()


BASIC_STATUS = ("protocol", "version", "healthy")


def shape(caller: Caller, op: str, result: Any, facts: Facts) -> Any:
    """The answer as `caller` may see it."""
    rule = rule_for(caller, op)
    if rule is None or rule.shape is Shape.WHOLE:
        return result
    if rule.shape is Shape.OWNED:
        return [v for v in result if facts.owners.get(str(v.get("name"))) == caller.uid]
    basic = {k: result[k] for k in BASIC_STATUS if k in result}
    return {**basic, "user": caller.user, "role": caller.role.value}
