"""The rights table (gateway.tenants.rights): pure, no gatewayd. Admins pass everything; a
tenant reaches only the ops of TENANT_RULES, with their per-op argument checks, and sees only
its own volumes and the basic status. Also the tenant's own id range, the socket's ACL entry
and the access policy's roles."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gateway.admin import args as arguments
from gateway.admin.ops import OPS
from gateway.admin.server import AccessPolicy, Peer
from gateway.errors import Forbidden, InvalidArgument, PermissionDenied
from gateway.tenants import ids, rights
from gateway.tenants import socket as tenant_socket
from gateway.tenants.rights import Caller, Facts, Role

pytestmark = pytest.mark.timeout(30)

ALICE = Caller(Role.TENANT, 2001, "alice")
ADMIN = Caller(Role.ADMIN, 1500, "1500")
FACTS = Facts(owners={"a1": 2001, "b1": 2002, "base": None, "pub2": None},
              published=frozenset({"base", "pub2"}),
              domains={"alice-web": "a1", "bob-web": "b1"}, subids=True)


def reason(op: str, args: dict[str, object], facts: Facts = FACTS,
           caller: Caller = ALICE) -> str | None:
    refusal = rights.check(caller, op, args, facts)
    return None if refusal is None else refusal.reason


def test_the_table_names_only_real_ops_and_keys() -> None:
    for op, rule in rights.TENANT_RULES.items():
        assert op in OPS, op
        spec = arguments.SPECS[op]
        keys = [*rule.owned, *rule.published, *(r.key for r in rule.required),
                *(b.key for b in rule.barred), *([rule.domain] if rule.domain else [])]
        assert set(keys) <= set(spec), (op, set(keys) - set(spec))
    assert rights.HOST_PATH_OPS <= set(OPS)


def test_admins_may_do_everything() -> None:
    for op in OPS:
        assert reason(op, {"name": "b1", "path": "/etc/shadow"}, Facts(), ADMIN) is None


@pytest.mark.parametrize(("op", "args", "expected"), [
    # what a tenant may do
    ("status", {}, None),
    ("volume-list", {}, None),
    ("volume-show", {"name": "a1"}, None),
    ("volume-remove", {"name": "a1"}, None),
    ("volume-create", {"name": "n", "from": "base", "overlay": True}, None),
    ("volume-create", {"name": "n", "from": "base", "overlay": True, "noexec": True}, None),
    ("mount", {"name": "a1", "userns": True}, None),
    ("umount", {"name": "a1", "force": True}, None),
    ("domain-start", {"name": "new", "volume": "a1", "userns": True}, None),
    ("domain-start", {"name": "alice-web", "volume": "a1", "userns": True}, None),
    ("domain-stop", {"name": "alice-web"}, None),
    # another tenant's or the admin's volume, or none at all: the same answer
    ("volume-show", {"name": "b1"}, rights.NOT_OWNER),
    ("volume-show", {"name": "base"}, rights.NOT_OWNER),
    ("volume-show", {"name": "nothing"}, rights.NOT_OWNER),
    ("volume-remove", {"name": "b1"}, rights.NOT_OWNER),
    ("mount", {"name": "b1", "userns": True}, rights.NOT_OWNER),
    ("umount", {"name": "b1"}, rights.NOT_OWNER),
    ("domain-start", {"name": "x", "volume": "b1", "userns": True}, rights.NOT_OWNER),
    ("domain-start", {"name": "bob-web", "volume": "a1", "userns": True}, rights.NOT_OWNER),
    ("domain-stop", {"name": "bob-web"}, rights.NOT_OWNER),
    ("domain-stop", {"name": "unknown"}, rights.NOT_OWNER),
    # only in a user namespace, with gatewayd's choice of map
    ("mount", {"name": "a1"}, rights.NEEDS_USERNS),
    ("mount", {"name": "a1", "userns": False}, rights.NEEDS_USERNS),
    ("mount", {"name": "a1", "userns": True, "idmap": {"uid_first": 1, "gid_first": 1,
                                                       "count": 65536}}, rights.ADMIN_ONLY),
    ("domain-start", {"name": "n", "volume": "a1"}, rights.NEEDS_USERNS),
    ("umount", {"name": "a1", "if_unused": True}, rights.ADMIN_ONLY),
    # only overlays of published volumes
    ("volume-create", {"name": "n", "from": "a1", "overlay": True}, rights.UNPUBLISHED),
    ("volume-create", {"name": "n", "from": "b1", "overlay": True}, rights.UNPUBLISHED),
    ("volume-create", {"name": "n", "from": "base", "copy": True}, rights.OVERLAY_ONLY),
    ("volume-create", {"name": "n", "from": "base"}, rights.OVERLAY_ONLY),
    ("volume-create", {"name": "n", "size": "1G", "format": "raw", "mkfs": "ext4"},
     rights.OVERLAY_ONLY),
    ("volume-create", {"name": "n", "from": "base", "overlay": True, "setuid": True},
     rights.ADMIN_ONLY),
    # host paths and admin ops
    ("volume-add", {"name": "n", "path": "/srv/x.raw", "format": "raw"}, rights.HOST_PATH),
    ("volume-import", {"name": "n", "tarball": "/x.tar", "size": "1G"}, rights.HOST_PATH),
    ("volume-save", {"name": "a1", "file": "/x", "format": "raw"}, rights.HOST_PATH),
    ("volume-snapshot", {"name": "a1", "to": "s"}, rights.ADMIN_ONLY),
    ("export", {"name": "a1"}, rights.ADMIN_ONLY),
    ("metrics", {}, rights.ADMIN_ONLY),
    ("shutdown", {}, rights.ADMIN_ONLY),
    ("volume-publish", {"name": "a1"}, rights.ADMIN_ONLY),
    ("volume-chown", {"name": "b1", "user": "alice"}, rights.ADMIN_ONLY),
    ("domain-list", {}, rights.ADMIN_ONLY),
    ("job-list", {}, rights.ADMIN_ONLY),
])
def test_tenant_requests(op: str, args: dict[str, object], expected: str | None) -> None:
    assert reason(op, args) == expected


def test_userns_needs_the_tenants_own_subids() -> None:
    none = Facts(owners=FACTS.owners, published=FACTS.published, domains=FACTS.domains)
    assert reason("mount", {"name": "a1", "userns": True}, none) == rights.NO_SUBIDS
    assert reason("domain-start", {"name": "n", "volume": "a1", "userns": True},
                  none) == rights.NO_SUBIDS
    assert reason("umount", {"name": "a1"}, none) is None


def test_refusals_are_one_line_naming_the_missing_right() -> None:
    refusal = rights.check(ALICE, "volume-add", {"name": "n", "path": "/x"}, FACTS)
    assert refusal is not None
    error = refusal.error()
    assert isinstance(error, Forbidden) and error.code == "forbidden"
    assert error.reason == rights.HOST_PATH
    assert error.message == ("user alice is a tenant: volume-add names host storage (a path, "
                             "a pool or an RBD image), which needs the admin right")
    with pytest.raises(Forbidden, match="user alice owns no volume named b1"):
        rights.enforce(ALICE, "volume-show", {"name": "b1"}, FACTS)
    with pytest.raises(Forbidden, match="metrics needs the admin right"):
        rights.enforce(ALICE, "metrics", {}, FACTS)
    message = rights.no_subids("carol").message
    assert "no entries in /etc/subuid and /etc/subgid" in message and "\n" not in message


def test_answers_are_cut_down_for_tenants() -> None:
    volumes = [{"name": "a1"}, {"name": "b1"}, {"name": "base"}]
    assert rights.shape(ALICE, "volume-list", volumes, FACTS) == [{"name": "a1"}]
    assert rights.shape(ADMIN, "volume-list", volumes, FACTS) == volumes
    status = {"protocol": 3, "version": "x", "healthy": True, "state_dir": "/var/lib/sg",
              "security": {}, "reconcile": {}}
    assert rights.shape(ALICE, "status", status, FACTS) == {
        "protocol": 3, "version": "x", "healthy": True, "user": "alice", "role": "tenant"}
    assert rights.shape(ADMIN, "status", status, FACTS) == status


def test_own_range_comes_from_the_users_own_entries(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("storage-gateway:2000000000:1048576\nalice:300000:65536\n")
    subgid.write_text("alice:400000:65536\nstorage-gateway:2000000000:1048576\n")
    found = ids.load("alice", subuid=subuid, subgid=subgid)
    assert (found.id_range.uid_start, found.id_range.gid_start) == (300000, 400000)
    # the gateway's own range is someone else's: never handed to alice
    assert (2000000000, 2001048576) in found.reserved.uids
    assert ids.own_range("bob", subuid=subuid, subgid=subgid) is None
    with pytest.raises(Forbidden, match="user bob is a tenant with no entries"):
        ids.load("bob", subuid=subuid, subgid=subgid)


def test_socket_acl_admits_the_tenant_group(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        tenant_socket.admit_group(path, 4242)
        assert tenant_socket.admitted_groups(path) == {4242}
        assert os.stat(path).st_mode & 0o777 == 0o660  # the mask shows as the group bits
    finally:
        sock.close()


def test_policy_roles() -> None:
    me = os.getpid()
    policy = AccessPolicy(None, "root")  # gid 0 as the tenant group
    assert policy.check(Peer(me, 0, 0)) is Role.ADMIN
    assert policy.check(Peer(me, 1234, 0)) is Role.TENANT
    gone = 2**22 + 1  # above pid_max: no /proc entry, so no supplementary groups
    with pytest.raises(PermissionDenied, match=r"allowed: root or tenants \(members of group "
                                               r"root\)"):
        policy.check(Peer(gone, 1234, 1234))
    both = AccessPolicy("root", "root")
    with pytest.raises(PermissionDenied, match=r"allowed: root, members of group root or "
                                               r"tenants \(members of group root\)"):
        both.check(Peer(gone, 1234, 1234))
    assert both.check(Peer(gone, 1234, 0)) is Role.ADMIN  # the admin group comes first
    with pytest.raises(InvalidArgument, match="tenant group no-such-group-sgwt does not exist"):
        AccessPolicy(None, "no-such-group-sgwt")
