"""mount(2)/umount2(2) via ctypes and the mountinfo parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import Conflict, NotFound
from gateway.host import mounts

SAMPLE = (
    "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "37 36 0:5 / /a\\011tab\\012nl\\134bs rw shared:7 - tmpfs my\\040src rw\n"
    "38 36 0:6 / /plain rw - fuse.blockview storage-gateway rw,user_id=0\n"
)


def test_parse_mountinfo_unescapes() -> None:
    infos = mounts.parse_mountinfo(SAMPLE)
    assert [m.mount_point for m in infos] == ["/mnt/with space", "/a\ttab\nnl\\bs", "/plain"]
    assert infos[0].root == "/mnt1" and infos[0].fstype == "ext3"
    assert infos[0].propagation == ("master:1",) and not infos[0].shared
    assert infos[1].source == "my src" and infos[1].shared
    assert infos[2].propagation == () and infos[2].fstype == "fuse.blockview"


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        for m in mounts.mounts_under(tmp_path):
            mounts.umount(m.mount_point, lazy=True)
        assert mounts.mounts_under(tmp_path) == []


@pytest.mark.timeout(30)
def test_tmpfs_mount_with_space_and_bind(base: Path) -> None:
    target = base / "a dir"
    target.mkdir()
    mounts.mount("gw test", target, "tmpfs", mounts.MS_NODEV | mounts.MS_NOSUID, "size=1m")
    assert mounts.is_mountpoint(target)
    info = mounts.mounts_at(target)[0]
    assert info.source == "gw test" and {"nodev", "nosuid"} <= set(info.options.split(","))
    (target / "f").write_text("hi")
    view = base / "ro view"
    view.mkdir()
    mounts.bind(target, view, read_only=True, noexec=True)
    opts = set(mounts.mounts_at(view)[0].options.split(","))
    assert {"ro", "nodev", "noexec"} <= opts
    assert (view / "f").read_text() == "hi"
    with pytest.raises(OSError):
        (view / "g").write_text("no")
    assert {m.mount_point for m in mounts.mounts_under(base)} == {str(view), str(target)}
    held = open(view / "f")
    try:
        with pytest.raises(Conflict):
            mounts.umount(view)
    finally:
        held.close()
    mounts.umount(view)
    mounts.umount(target)
    assert not mounts.is_mountpoint(target)


@pytest.mark.timeout(30)
def test_make_shared_and_lazy_umount(base: Path) -> None:
    root = base / "root"
    root.mkdir()
    mounts.bind(root, root, nodev=False)
    mounts.make_private(root)
    mounts.make_shared(root)
    assert mounts.mounts_at(root)[-1].shared
    inner = root / "inner"
    inner.mkdir()
    mounts.mount("tmpfs", inner, "tmpfs")
    assert next(m.mount_point for m in mounts.mounts_under(root)) == str(inner)  # deepest first
    mounts.umount(inner, lazy=True)
    mounts.umount(root)
    assert not mounts.is_mountpoint(root)


@pytest.mark.timeout(30)
def test_errors_are_typed(base: Path) -> None:
    with pytest.raises(NotFound):
        mounts.mount("tmpfs", base / "missing", "tmpfs")
    with pytest.raises(mounts.MountError):
        mounts.umount(base)  # not a mount point: EINVAL
    with pytest.raises(mounts.MountError):
        mounts.mount("x", base, "no-such-fs-type")
