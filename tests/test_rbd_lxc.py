"""A libvirt-lxc container boots from an RBD volume: a real cluster, the session's real libvirtd
with the gateway hook, a real gatewayd on the run dir that libvirtd was prepared for."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.ceph import Cluster
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER
from tests.ceph_env import ceph_cluster, rbd_disk
from tests.libvirt_env import LibvirtEnv, libvirt_env, serving_gatewayd

__all__ = ["ceph_cluster", "libvirt_env", "rbd_disk"]  # the session fixtures
PREFIX = "rbd-"


def ctl_json(gw: Daemon, *args: str) -> Any:
    return json.loads(gw.ctl(*args, "--json", check=True).stdout)


def in_container(name: str, *argv: str) -> str:
    proc = subprocess.run(["virsh", "-q", "-c", "lxc:///", "lxc-enter-namespace", name,
                           "--noseclabel", *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def lxc_host(libvirt_env: LibvirtEnv, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Daemon]:
    with serving_gatewayd(libvirt_env, tmp_path_factory.mktemp("rbd-lxc"), PREFIX,
                          ["--host-id", "lxc-host", "--ceph-timeout", "5"]) as daemon:
        yield daemon


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_container_boots_from_an_rbd_volume(lxc_host: Daemon, ceph_cluster: Cluster,
                                            rbd_disk: Path, mode: str) -> None:
    image = ceph_cluster.import_image(rbd_disk, f"boot-{mode}")
    volume, name = f"boot-{mode}", f"{PREFIX}{mode}"
    ctl_json(lxc_host, "volume", "add", volume, "--rbd", image, "--ceph-conf",
             str(ceph_cluster.conf), "--format", "raw")
    ctl_json(lxc_host, "domain", "start", name, "--volume", volume, "--mode", mode)
    try:
        assert in_container(name, "/bin/cat", "/etc/marker") == MARKER
        in_container(name, "/bin/sh", "-c", "echo from-container > /etc/written && sync")
    finally:
        ctl_json(lxc_host, "domain", "stop", name)
    assert ctl_json(lxc_host, "volume", "show", volume)["attachment"] is None
    assert ctl_json(lxc_host, "status")["leases"][volume]["state"] == "held"
    assert ctl_json(lxc_host, "volume", "release", volume)["released"] is True
    # The container's write reached the cluster: read it back on a fresh mount.
    rootfs = Path(lxc_host.ctl("mount", volume, check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "written").read_text() == "from-container\n"
    finally:
        lxc_host.ctl("umount", volume, check=True)
    lxc_host.ctl("volume", "release", volume, check=True)
    lxc_host.ctl("volume", "rm", volume, check=True)


@pytest.mark.timeout(120)
def test_container_boots_from_an_rbd_overlay(lxc_host: Daemon, ceph_cluster: Cluster,
                                             rbd_disk: Path) -> None:
    """An overlay of an RBD volume (a snapshot + clone in the cluster) boots; what the container
    writes stays in the clone, the base is as it was."""
    image = ceph_cluster.import_image(rbd_disk, "boot-base")
    ctl_json(lxc_host, "volume", "add", "boot-base", "--rbd", image, "--ceph-conf",
             str(ceph_cluster.conf), "--format", "raw")
    ctl_json(lxc_host, "volume", "create", "boot-clone", "--from", "boot-base", "--overlay")
    name = f"{PREFIX}clone"
    ctl_json(lxc_host, "domain", "start", name, "--volume", "boot-clone")
    try:
        assert in_container(name, "/bin/cat", "/etc/marker") == MARKER
        in_container(name, "/bin/sh", "-c", "echo in-clone > /etc/written && sync")
    finally:
        ctl_json(lxc_host, "domain", "stop", name)
    rootfs = Path(lxc_host.ctl("mount", "boot-base", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER
        assert not (rootfs / "etc" / "written").exists()
    finally:
        lxc_host.ctl("umount", "boot-base", check=True)
    rootfs = Path(lxc_host.ctl("mount", "boot-clone", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "written").read_text() == "in-clone\n"
    finally:
        lxc_host.ctl("umount", "boot-clone", check=True)
    lxc_host.ctl("volume", "rm", "boot-clone", check=True)
    lxc_host.ctl("volume", "rm", "boot-base", check=True)
    assert "boot-clone" not in ceph_cluster.rbd("ls", "rbd").split()
