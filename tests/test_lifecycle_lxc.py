"""Booting libvirt-lxc containers from overlays of one base (real gatewayd, real libvirtd).

The session's libvirtd (tests/libvirt_env.py) was started with BASE/rootfs already shared and its
hook pointing at BASE/admin.sock, so the gatewayd here runs with --run-dir BASE.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image
from tests.libvirt_env import LibvirtEnv, libvirt_env, serving_gatewayd

__all__ = ["libvirt_env"]  # the session fixture

PREFIX = "lc-"


def in_container(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", "lxc:///", "lxc-enter-namespace", name,
                           "--noseclabel", *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def booted(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while in_container(name, "/bin/cat", "/run/booted").returncode != 0:
        assert time.monotonic() < deadline, f"{name} did not boot"
        time.sleep(0.1)


@pytest.fixture
def lxc_gw(libvirt_env: LibvirtEnv, tmp_path: Path) -> Iterator[Daemon]:
    with serving_gatewayd(libvirt_env, tmp_path, PREFIX) as daemon:
        yield daemon


@pytest.mark.timeout(150)
def test_containers_boot_from_two_overlays_of_one_base(
        lxc_gw: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    base = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "base.qcow2")
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    lxc_gw.ctl("volume", "add", "lc-base", str(base), "--format", "qcow2", check=True)
    for i in (1, 2):
        lxc_gw.ctl("volume", "create", f"lc-ov{i}", "--from", "lc-base", "--overlay", check=True)
        lxc_gw.ctl("domain", "start", f"{PREFIX}c{i}", "--volume", f"lc-ov{i}", check=True)
    for i in (1, 2):
        booted(f"{PREFIX}c{i}")
        marker = in_container(f"{PREFIX}c{i}", "/bin/cat", "/etc/marker")
        assert marker.stdout == MARKER, marker.stderr
        wrote = in_container(f"{PREFIX}c{i}", "/bin/sh", "-c", f"echo c{i} > /root/who; sync")
        assert wrote.returncode == 0, wrote.stderr
    # While overlays run, the base cannot be removed.
    refused = lxc_gw.ctl("volume", "rm", "lc-base")
    assert refused.returncode != 0 and "base of overlays" in refused.stderr
    for i in (1, 2):
        lxc_gw.ctl("domain", "stop", f"{PREFIX}c{i}", check=True)
    for i in (1, 2):
        rootfs = Path(json.loads(lxc_gw.ctl("mount", f"lc-ov{i}", "--json",
                                            check=True).stdout)["rootfs"])
        try:
            assert (rootfs / "root" / "who").read_text() == f"c{i}\n"
        finally:
            lxc_gw.ctl("umount", f"lc-ov{i}", check=True)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before
