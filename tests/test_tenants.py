"""Issue 17 part 3, tenants: real users of a tenant group talk to a real gatewayd through the
default socket path (runuser, GATEWAY_RUN_DIR), with real /etc/subuid and /etc/subgid entries and
a real libvirtd.

A tenant with subordinate ids makes an overlay of a published volume, mounts it with --userns and
starts a --userns container on it, whose init runs as the first id of the tenant's own range, and
stops it. The same tenant is refused, with one line naming the missing right: another tenant's
volume, `volume add` with a path, a mount or domain without --userns, an overlay of an unpublished
volume, admin ops. A tenant without subordinate ids is refused a --userns mount. list and show
show only the tenant's own volumes; the admin can give a volume away; metrics and status count
the refusals by reason and the unprivileged domains.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.tenants.socket import admitted_groups
from gateway.testing.daemon import BIN, Daemon
from gateway.testing.images import ImageSet, copy_image
from tests.libvirt_env import (
    LibvirtEnv,
    container_init,
    libvirt_env,
    open_ancestors,
    serving_gatewayd,
)

__all__ = ["libvirt_env"]  # the session fixture
pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.fuse, pytest.mark.libvirtd]

GROUP = "sgwt-tenants"
ALICE, BOB, CAROL = "sgwt-alice", "sgwt-bob", "sgwt-carol"  # carol has no subordinate ids
SLICE = 65536
FIRST = {ALICE: 3_000_000_000, BOB: 3_000_000_000 + SLICE}
SUBFILES = (Path("/etc/subuid"), Path("/etc/subgid"))
DOMAIN = "sgwt-alice-web"


def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"


def _drop_lines(path: Path, users: tuple[str, ...]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.split(":", 1)[0] not in users]
    if kept != lines:
        path.write_text("".join(kept))


@pytest.fixture(scope="module")
def tenants() -> Iterator[None]:
    """Throwaway users in a throwaway tenant group; alice and bob get one slice each in
    /etc/subuid and /etc/subgid. Everything goes afterwards, the two files as they were."""
    users = (ALICE, BOB, CAROL)
    _remove(users)  # what a killed run may have left
    before = {path: path.read_bytes() for path in SUBFILES}
    try:
        sh("groupadd", "--system", GROUP)
        for user in users:
            sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
               "--groups", GROUP, user)
        for user, first in FIRST.items():
            span = f"{first}-{first + SLICE - 1}"
            sh("usermod", "--add-subuids", span, "--add-subgids", span, user)
        yield
    finally:
        _remove(users)
        after = {path: path.read_bytes() for path in SUBFILES}
        assert after == before


def _remove(users: tuple[str, ...]) -> None:
    """The test's users, their group and their /etc/subuid and /etc/subgid lines."""
    for user in users:
        subprocess.run(["userdel", user], capture_output=True, check=False)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)
    for path in SUBFILES:
        _drop_lines(path, users)


@dataclass
class Tenancy:
    gw: Daemon
    uri: str
    modes: dict[Path, int]  # of the run dir's ancestors, to put back

    def run(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """gatewayctl as `user`, on the default socket path of the run dir (no --socket).
        Another pytest session starting meanwhile puts /tmp/pytest-of-root back to 0700: the
        ancestors are opened again before each call."""
        for path, mode in open_ancestors(self.gw.run_dir).items():
            self.modes.setdefault(path, mode)
        argv = ["runuser", "-u", user, "--", "env", f"GATEWAY_RUN_DIR={self.gw.run_dir}",
                str(BIN / "gatewayctl"), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")

    def ok(self, user: str, *args: str) -> Any:
        proc = self.run(user, *args, "--json")
        assert proc.returncode == 0, f"{user}: {args}: {proc.stderr}\n{self.gw.log_tail()}"
        return json.loads(proc.stdout)

    def refused(self, user: str, *args: str) -> str:
        """The one-line refusal of a request (exit code 1, no traceback)."""
        proc = self.run(user, *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("gatewayctl: ")
        return proc.stderr.strip()

    def admin(self, *args: str) -> Any:
        return json.loads(self.gw.ctl(*args, "--json", check=True).stdout)


@pytest.fixture(scope="module")
def tenancy(tenants: None, libvirt_env: LibvirtEnv,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    modes = open_ancestors(libvirt_env.socket_path.parent)
    try:
        with serving_gatewayd(libvirt_env, tmp_path_factory.mktemp("tenants"), "sgwt-",
                              ["--tenant-group", GROUP]) as daemon:
            yield Tenancy(daemon, libvirt_env.uri, modes)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.timeout(120)
def test_tenants(tenancy: Tenancy, image_set: ImageSet, tmp_path: Path) -> None:
    t, gw = tenancy, tenancy.gw
    alice_uid = pwd.getpwnam(ALICE).pw_uid
    # The socket keeps its owner group and mode; the tenant group gets an ACL entry.
    st = os.stat(gw.socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o660)
    assert admitted_groups(gw.socket) == {grp.getgrnam(GROUP).gr_gid}

    base = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "base.qcow2")
    t.admin("volume", "add", "base", str(base), "--format", "qcow2")
    t.admin("volume", "add", "private", str(copy_image(image_set.path("gpt", "raw"),
                                                       tmp_path / "private.raw")),
            "--format", "raw")
    published = t.admin("volume", "publish", "base")
    assert (published["owner"], published["published"]) == (None, True)

    # A tenant sees only what it owns, and the basic status.
    assert t.ok(ALICE, "volume", "ls") == []
    assert t.ok(ALICE, "status") == {"protocol": t.admin("status")["protocol"],
                                     "version": t.admin("status")["version"],
                                     "healthy": True, "user": ALICE, "role": "tenant"}
    made = t.ok(ALICE, "volume", "create", "a1", "--from", "base", "--overlay")["result"]
    assert (made["owner"], made["origin"], made["base"]) == (alice_uid, "overlay", "base")
    assert Path(made["path"]).parent == gw.state_dir / "volumes"
    assert [v["name"] for v in t.ok(ALICE, "volume", "ls")] == ["a1"]
    assert t.ok(ALICE, "volume", "show", "a1")["name"] == "a1"
    t.ok(BOB, "volume", "create", "b1", "--from", "base", "--overlay")
    t.ok(CAROL, "volume", "create", "c1", "--from", "base", "--overlay")
    assert [v["name"] for v in t.ok(BOB, "volume", "ls")] == ["b1"]

    # What alice may not do.
    prefix = f"gatewayctl: user {ALICE} is a tenant: "
    for name, args in (("b1", ("volume", "show", "b1")), ("base", ("volume", "show", "base")),
                       ("b1", ("volume", "rm", "b1")), ("b1", ("mount", "b1", "--userns")),
                       ("b1", ("umount", "b1"))):
        assert t.refused(ALICE, *args) == f"{prefix}user {ALICE} owns no volume named {name}"
    assert t.refused(ALICE, "volume", "add", "x", str(base), "--format", "qcow2") == (
        f"{prefix}volume-add names host storage (a path, a pool or an RBD image), which needs "
        "the admin right")
    assert t.refused(ALICE, "mount", "a1") == (
        f"{prefix}tenants mount volumes and start domains only in a user namespace: add "
        "--userns")
    assert "only in a user namespace" in t.refused(ALICE, "domain", "start", DOMAIN,
                                                   "--volume", "a1")
    assert t.refused(ALICE, "volume", "create", "a2", "--from", "private", "--overlay") == (
        f"{prefix}volume private is not published for tenants (the admin publishes it: volume "
        "publish private)")
    assert "is not published" in t.refused(ALICE, "volume", "create", "a2", "--from", "a1",
                                           "--overlay")
    assert "only overlays" in t.refused(ALICE, "volume", "create", "a2", "--from", "base",
                                        "--copy")
    admin_ops: list[tuple[str, ...]] = [
        ("metrics",), ("volume", "publish", "a1"), ("volume", "chown", "b1", ALICE),
        ("export", "a1"), ("volume", "snapshot", "a1", "--to", "s"), ("shutdown",),
        ("domain", "ls")]
    for op in admin_ops:
        assert t.refused(ALICE, *op).endswith("needs the admin right"), op
    # Without subordinate ids: no --userns at all.
    assert t.refused(CAROL, "mount", "c1", "--userns") == (
        f"gatewayctl: user {CAROL} is a tenant with no entries in /etc/subuid and /etc/subgid, "
        "which a tenant's --userns containers take their ids from (the admin adds them: "
        f"usermod --add-subuids FIRST-LAST --add-subgids FIRST-LAST {CAROL})")
    assert t.admin("volume", "show", "c1")["attachment"] is None
    # nothing the refusals asked for was made
    assert [v["name"] for v in t.admin("volume", "ls")] == ["a1", "b1", "base", "c1", "private"]
    assert sorted(p.name.split("-")[0] for p in (gw.state_dir / "volumes").iterdir()) == [
        "a1", "b1", "c1"]

    # A --userns mount, then a --userns container: slices of alice's own range.
    mounted = t.ok(ALICE, "mount", "a1", "--userns")
    assert mounted["idmap"] == {"uid_first": FIRST[ALICE], "gid_first": FIRST[ALICE],
                                "count": SLICE}
    assert t.ok(ALICE, "umount", "a1")["mounted"] is False
    started = t.ok(ALICE, "domain", "start", DOMAIN, "--volume", "a1", "--userns")
    assert started["idmap"]["uid_first"] == FIRST[ALICE]
    assert container_init(t.uri, DOMAIN)[1] == FIRST[ALICE]
    assert t.refused(BOB, "domain", "stop", DOMAIN) == (
        f"gatewayctl: user {BOB} is a tenant: user {BOB} has no domain named {DOMAIN}")
    status = t.admin("status")
    assert status["userns"] == {"mounts": 1, "domains": 1}
    assert t.ok(ALICE, "domain", "stop", DOMAIN)["stopped"] is True
    assert t.admin("volume", "show", "a1")["attachment"] is None

    # The admin gives bob's volume to alice; alice removes her volumes (their files go too).
    assert t.admin("volume", "chown", "b1", ALICE)["owner"] == alice_uid
    assert [v["name"] for v in t.ok(ALICE, "volume", "ls")] == ["a1", "b1"]
    assert t.ok(BOB, "volume", "ls") == []
    for name in ("a1", "b1"):
        path = Path(t.admin("volume", "show", name)["path"])
        t.ok(ALICE, "volume", "rm", name)
        assert not path.exists()
    t.admin("volume", "rm", "c1")

    refusals = t.admin("status")["refusals"]
    assert refusals["not-owner"] == 6 and refusals["no-subids"] == 1, refusals
    assert refusals["admin-only"] == 7 and refusals["host-path"] == 1, refusals
    text = gw.ctl("metrics", check=True).stdout
    assert 'gateway_refusals_total{reason="needs-userns"} 2.0' in text
    assert 'gateway_refusals_total{reason="unpublished"} 2.0' in text
