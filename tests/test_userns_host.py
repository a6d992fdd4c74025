"""Issue 17 on the host, without libvirt: user-namespace fds made by a helper that is gone
afterwards, idmapped mounts of real filesystems (and the refusal naming a type the kernel will not
idmap, with nothing attached), the search ACL on a real directory, and a gatewayd that refuses
--userns without a range or in fuse mode with one line and nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.attach import attachment
from gateway.attach.journal import IdmapStep, Phase
from gateway.errors import FormatError
from gateway.host import acl, idmap, loopdev, mounts
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image
from gateway.userns.slices import IdMap

pytestmark = pytest.mark.root
IDS = IdMap(3_000_000_000, 3_000_100_000)


def helpers() -> list[str]:
    """Live `unshare --user` helpers of ours (their shell waits on `read _`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.endswith(b"echo; read _\0"):
            found.append(pid)
    return found


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    src = tmp_path / "src"
    src.mkdir()
    mounts.mount("gateway-test", src, "tmpfs", mounts.MS_NODEV, "mode=0755")
    try:
        yield src
    finally:
        for path in (tmp_path / "dst", src):
            while mounts.is_mountpoint(path):
                mounts.umount(path)


@pytest.mark.timeout(30)
def test_user_namespace_fd_carries_the_map_and_the_helper_is_gone() -> None:
    before = set(helpers())
    fd = idmap.user_namespace(IDS)
    try:
        assert set(helpers()) == before
        # the namespace outlives its helper through the fd
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("user:[")
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_idmapped_bind_shifts_owners_and_flags(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "root-file").write_text("x")
    (tmpfs / "user-file").write_text("y")
    os.chown(tmpfs / "user-file", 1000, 1001)
    dst = tmp_path / "dst"
    dst.mkdir()
    idmap.idmapped_bind(tmpfs, dst, IDS, fstype="tmpfs", nosuid=True, noexec=True)
    top = mounts.mounts_at(dst)[-1]
    assert idmap.is_idmapped(top.options)
    assert {"nosuid", "nodev", "noexec"} <= set(top.options.split(","))
    st = os.stat(dst / "root-file")
    assert (st.st_uid, st.st_gid) == (IDS.uid_first, IDS.gid_first)
    st = os.stat(dst / "user-file")
    assert (st.st_uid, st.st_gid) == (IDS.uid_first + 1000, IDS.gid_first + 1001)
    # host root is not mapped: it cannot create files through the idmapped mount
    with pytest.raises(OSError):
        (dst / "new").write_text("z")
    assert not (tmpfs / "new").exists()


@pytest.mark.timeout(30)
def test_a_filesystem_the_kernel_cannot_idmap_is_refused_before_attaching(tmp_path: Path) -> None:
    src, dst = tmp_path / "ramfs", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    mounts.mount("gateway-test", src, "ramfs", mounts.MS_NODEV)
    try:
        with pytest.raises(FormatError, match="cannot idmap a ramfs mount"):
            idmap.idmapped_bind(src, dst, IDS, fstype="ramfs")
        assert not mounts.is_mountpoint(dst)
    finally:
        mounts.umount(src)


@pytest.mark.timeout(30)
def test_search_acl_lets_one_uid_through() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-acl-") as top:  # pytest's dirs are 0700
        os.chmod(top, 0o711)
        gate = Path(top) / "gate"
        gate.mkdir(mode=0o700)
        (gate / "inner").mkdir()
        check_search_acl(gate)


def check_search_acl(gate: Path) -> None:
    def stat_as(uid: int) -> int:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                               "stat", str(gate / "inner")], capture_output=True).returncode

    assert stat_as(IDS.uid_first) != 0
    acl.allow_search(gate, IDS.uid_first)
    assert acl.search_allowed(gate) == {IDS.uid_first}
    assert stat_as(IDS.uid_first) == 0
    assert stat_as(IDS.uid_first + 1) != 0
    acl.revoke_search(gate, IDS.uid_first)
    assert acl.search_allowed(gate) == set()
    assert os.stat(gate).st_mode & 0o777 == 0o700
    assert stat_as(IDS.uid_first) != 0


@pytest.mark.timeout(60)
def test_gatewayd_refuses_userns_cleanly(gatewayd: Daemon, image_set: ImageSet,
                                         tmp_path: Path) -> None:
    image = copy_image(image_set.path("none", "raw"), tmp_path / "v.raw")
    gatewayd.ctl("volume", "add", "v", str(image), "--format", "raw", check=True)
    for argv, message in (
            (("mount", "v", "--userns"), "--userns needs an id range"),
            (("mount", "v", "--userns", "--mode", "fuse"), "--userns needs an id range")):
        proc = gatewayd.ctl(*argv)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        shown = json.loads(gatewayd.ctl("volume", "show", "v", "--json", check=True).stdout)
        assert shown["attachment"] is None and not shown["exported"]
        run = gatewayd.run_dir
        assert not mounts.mounts_under(run / "mnt")
        assert not mounts.mounts_under(run / "rootfs" / "v")
        assert not loopdev.devices_backed_by(run)
    # a plain mount is not refused, and a --userns request on it is
    gatewayd.ctl("mount", "v", check=True)
    proc = gatewayd.ctl("mount", "v", "--userns")
    assert proc.returncode != 0 and "already mounted without --userns" in proc.stderr
    gatewayd.ctl("umount", "v", check=True)


@pytest.mark.timeout(30)
def test_reconcile_tears_down_an_idmapped_rootfs_and_its_acl(tmp_path: Path) -> None:
    """What a crashed gatewayd left of a --userns attachment: the idmapped rootfs over the
    kernel mount and the slice's search ACL entry; reconcile, guided by the journal, removes
    both."""
    run_dir = tmp_path / "run"
    lay = attachment.RunLayout(run_dir)
    lay.prepare()
    mnt, rootfs = lay.mnt("vol"), lay.rootfs("vol")
    for d in (mnt, rootfs):
        d.mkdir()
    mounts.mount("gateway-test", mnt, "tmpfs", mounts.MS_NODEV)
    acl.allow_search(lay.rootfs_root, IDS.uid_first)
    idmap.idmapped_bind(mnt, rootfs, IDS, fstype="tmpfs")
    entries = [IdmapStep(Phase.START, IDS.uid_first, IDS.gid_first, IDS.count,
                         source=str(mnt), target=str(rootfs))]
    try:
        report = attachment.reconcile(run_dir, "vol", entries)
        assert not report.remaining and not report.errors, report
        assert f"revoked the search ACL of uid {IDS.uid_first}" in report.done
        assert not mounts.is_mountpoint(rootfs) and not mounts.is_mountpoint(mnt)
        assert acl.search_allowed(lay.rootfs_root) == set()
    finally:
        for path in (rootfs, mnt):
            while mounts.is_mountpoint(path):
                mounts.umount(path, lazy=True)
