"""Issue 17: user-namespace domains on idmapped rootfs, with a real gatewayd and a real libvirtd.

Four bind-mode `--userns` domains run at once, on ext2, ext3, ext4 and xfs volumes: each gets its
own slice of the configured range; inside, `id -u` is 0, /proc/self/uid_map shows the slice and
/etc/marker is owned by 0; on the host the container's init runs as the slice's first uid. What
the containers write lands on disk with the ids they gave it, and no other owner in the images
changes (an owners listing of a plain mount of each image, before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.host import acl
from gateway.libvirt import domain
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, build_rootfs_tree, copy_image
from gateway.userns.slices import IdMap
from tests.libvirt_env import (
    LibvirtEnv,
    container_init,
    libvirt_env,
    open_ancestors,
    serving_gatewayd,
)

__all__ = ["libvirt_env"]  # the session fixture
pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.fuse, pytest.mark.libvirtd]

PREFIX = "uns-"
RANGE_START = 2_000_000_000
SLICE = 65536
RANGE = f"{RANGE_START}:{4 * SLICE}"
FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs")
# owners the images carry besides root's: an idmapped mount must leave them as they are
OWNED = {"etc/hostname": (1234, 5678), "root": (4321, 4321), "bin/busybox": (0, 99)}


def sh(*argv: str | Path) -> None:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"


def ctl_json(gw: Daemon, *args: str) -> Any:
    return json.loads(gw.ctl(*args, "--json", check=True).stdout)


def inside(pid: int, script: str) -> str:
    """Run a shell script as the container's root: nsenter joins every namespace of its init,
    the user namespace included, and takes uid and gid 0 there (virsh lxc-enter-namespace keeps
    the host's uid 0, which the namespace does not map: it would run as 65534)."""
    proc = subprocess.run(["nsenter", "-t", str(pid), "-a", "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def owners(image: Path, where: Path) -> dict[str, tuple[int, int]]:
    """path -> (uid, gid) of every file of a plain read-only mount of the image."""
    where.mkdir(exist_ok=True)
    sh("mount", "-o", "loop,ro", image, where)
    try:
        found = {}
        for top, dirs, files in os.walk(where):
            for entry in dirs + files:
                st = os.lstat(os.path.join(top, entry))
                found[os.path.relpath(os.path.join(top, entry), where)] = (st.st_uid, st.st_gid)
        return found
    finally:
        sh("umount", where)


def make_image(fs: str, tree: Path, work: Path) -> Path:
    """A raw whole-disk image of `fs` holding `tree` with its owners (cp -a through a loop
    mount, the same way for every type)."""
    image = work / f"{fs}.raw"
    with open(image, "wb") as f:
        f.truncate((300 if fs == "xfs" else 32) * 1024 * 1024)
    if fs == "xfs":
        sh("mkfs.xfs", "-q", "-f", image)
    else:
        sh(f"mkfs.{fs}", "-q", "-F", image)
    mnt = work / f"fill-{fs}"
    mnt.mkdir()
    sh("mount", "-o", "loop", image, mnt)
    try:
        sh("cp", "-a", f"{tree}/.", mnt)
    finally:
        sh("umount", mnt)
    return image


@pytest.fixture(scope="module")
def ugw(libvirt_env: LibvirtEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A gatewayd with a range of four slices, on the run dir the session's libvirtd watches."""
    modes = open_ancestors(libvirt_env.socket_path.parent)
    try:
        with serving_gatewayd(libvirt_env, tmp_path_factory.mktemp("userns"), PREFIX,
                              ["--userns-range", RANGE]) as daemon:
            yield daemon
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.timeout(150)
def test_userns_domains_on_every_kernel_fs(ugw: Daemon, libvirt_env: LibvirtEnv,
                                           tmp_path: Path) -> None:
    tree = build_rootfs_tree(tmp_path / "tree")
    for rel, (uid, gid) in OWNED.items():
        os.chown(tree / rel, uid, gid, follow_symlinks=False)
    images = {fs: make_image(fs, tree, tmp_path) for fs in FILESYSTEMS}
    before = {fs: owners(image, tmp_path / "look") for fs, image in images.items()}
    assert all(b[rel] == ids for b in before.values() for rel, ids in OWNED.items())
    names = {fs: f"{PREFIX}{fs}" for fs in FILESYSTEMS}
    try:
        for fs, image in images.items():
            ctl_json(ugw, "volume", "add", f"u-{fs}", str(image), "--format", "raw")
            open_ancestors(ugw.run_dir)
            started = ctl_json(ugw, "domain", "start", names[fs], "--volume", f"u-{fs}",
                               "--userns")
            assert started["idmap"]["count"] == SLICE
        listed = {d["name"]: d for d in ctl_json(ugw, "domain", "ls")}
        maps = {fs: listed[names[fs]]["idmap"] for fs in FILESYSTEMS}
        firsts = sorted(m["uid_first"] for m in maps.values())
        assert firsts == [RANGE_START + i * SLICE for i in range(4)]  # disjoint slices
        assert all(m["gid_first"] == m["uid_first"] for m in maps.values())
        for fs, name in names.items():
            first = maps[fs]["uid_first"]
            pid, uid = container_init(libvirt_env.uri, name)
            assert uid == first
            out = inside(pid, "id -u; cat /proc/self/uid_map; stat -c %u:%g /etc/marker; "
                               "cat /etc/marker; touch /made-by-root; touch /made-for-1000; "
                               "chown 1000:1000 /made-for-1000; sync").split("\n")
            assert out[0] == "0"
            assert out[1].split() == ["0", str(first), str(SLICE)]
            assert out[2] == "0:0"
            assert out[3] + "\n" == MARKER
            # the host's private kernel mount shows what landed on disk
            made = ugw.run_dir / "mnt" / f"u-{fs}"
            assert os.stat(made / "made-for-1000").st_uid == 1000
        assert "gateway_userns_mounts 4.0" in ugw.ctl("metrics", check=True).stdout
        assert acl.search_allowed(ugw.run_dir / "rootfs") == {m["uid_first"]
                                                              for m in maps.values()}
        # gatewayd restarts: every idmapped attachment is adopted with its map
        assert ugw.stop(everything=False) == 0
        ugw.start()
        for fs in FILESYSTEMS:
            shown = ctl_json(ugw, "volume", "show", f"u-{fs}")["attachment"]
            assert (shown["state"], shown["idmap"]) == ("adopted", maps[fs]), fs
    finally:
        for name in names.values():
            ugw.ctl("domain", "stop", name)
    for fs, image in images.items():
        assert ctl_json(ugw, "volume", "show", f"u-{fs}")["attachment"] is None
        after = owners(image, tmp_path / "look")
        assert after["made-by-root"] == (0, 0), fs
        assert after["made-for-1000"] == (1000, 1000), fs
        changed = {rel: (before[fs][rel], after.get(rel)) for rel in before[fs]
                   if after.get(rel) != before[fs][rel]}
        assert not changed, (fs, changed)
        ugw.ctl("volume", "rm", f"u-{fs}", check=True)
    assert not acl.search_allowed(ugw.run_dir / "rootfs")
    assert "gateway_userns_mounts 0.0" in ugw.ctl("metrics", check=True).stdout  # slices freed
    shutil.rmtree(tree)


@pytest.mark.timeout(90)
def test_hook_mounts_with_the_domains_own_map(ugw: Daemon, libvirt_env: LibvirtEnv,
                                              image_set: ImageSet, tmp_path: Path) -> None:
    """A domain defined with plain virsh, carrying userns metadata and its own <idmap>: the hook
    asks for exactly that map; a map outside the range fails the start and leaves nothing."""
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "hook.qcow2")
    ctl_json(ugw, "volume", "add", "u-hook", str(image), "--format", "qcow2")
    name = f"{PREFIX}hook"
    rootfs = str(ugw.run_dir / "rootfs" / "u-hook")
    mine = IdMap(RANGE_START + 3 * SLICE, RANGE_START + 3 * SLICE)
    outside = IdMap(RANGE_START + 8 * SLICE, RANGE_START + 8 * SLICE)
    try:
        for ids, ok in ((outside, False), (mine, True)):
            xml = tmp_path / "dom.xml"
            xml.write_text(domain.domain_xml(name, rootfs, "u-hook", "bind", ids=ids))
            sh("virsh", "-q", "-c", libvirt_env.uri, "define", xml)
            open_ancestors(ugw.run_dir)
            started = subprocess.run(["virsh", "-q", "-c", libvirt_env.uri, "start", name],
                                     capture_output=True, text=True, timeout=60)
            assert (started.returncode == 0) == ok, started.stderr
            shown = ctl_json(ugw, "volume", "show", "u-hook")["attachment"]
            if not ok:
                assert "lies outside --userns-range" in started.stderr
                assert shown is None
                sh("virsh", "-q", "-c", libvirt_env.uri, "undefine", name)
                continue
            assert shown["idmap"] == ids.to_json()
            pid, uid = container_init(libvirt_env.uri, name)
            assert uid == mine.uid_first
            assert inside(pid, "id -u; stat -c %u /etc/marker").split() == ["0", "0"]
    finally:
        subprocess.run(["virsh", "-q", "-c", libvirt_env.uri, "destroy", name],
                       capture_output=True, timeout=60)
        subprocess.run(["virsh", "-q", "-c", libvirt_env.uri, "undefine", name],
                       capture_output=True, timeout=60)
    deadline = time.monotonic() + 20
    while ctl_json(ugw, "volume", "show", "u-hook")["attachment"] is not None:
        assert time.monotonic() < deadline, "the hook's mount was not released"
        time.sleep(0.1)
    ugw.ctl("volume", "rm", "u-hook", check=True)
