"""Issue 6 end to end: a real gatewayd, a real libvirtd with the gateway hook, real containers.

The session's libvirtd (tests/libvirt_env.py) was started with BASE/rootfs already a shared mount
and with the hook pointing at BASE/admin.sock, so the gatewayd here runs with --run-dir BASE: its
rootfs mounts reach libvirtd and the hook reaches it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.host import loopdev, mounts
from gateway.libvirt import domain
from gateway.libvirt.hook import is_ours
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image
from tests.libvirt_env import LibvirtEnv, container_init, libvirt_env, serving_gatewayd

__all__ = ["libvirt_env"]  # the session fixture

PREFIX = "e2e-"


def ctl_json(gw: Daemon, *args: str) -> Any:
    proc = gw.ctl(*args, "--json", check=True)
    return json.loads(proc.stdout)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-q", "-c", "lxc:///", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def enter(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return virsh("lxc-enter-namespace", name, "--noseclabel", *argv, check=False)


def read_marker(name: str) -> str:
    proc = enter(name, "/bin/cat", "/etc/marker")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run_dir_mounts(run_dir: Path, standby: Iterable[str] = ()) -> list[str]:
    """Volume mounts and loop devices the gateway made under its run dir (the shared rootfs root
    and the block view belong to the daemon, not to a volume; `standby` loops to idle exports)."""
    keep = {str(run_dir / "rootfs"), str(run_dir / "blk")}
    found = [m.mount_point for m in mounts.mounts_under(run_dir) if m.mount_point not in keep]
    return found + [f"loop {d}" for d in loopdev.devices_backed_by(run_dir) if d not in standby]


def attachment(gw: Daemon, volume: str) -> Any:
    return ctl_json(gw, "volume", "show", volume)["attachment"]


def torn_down(gw: Daemon, volume: str) -> bool:
    return attachment(gw, volume) is None and not run_dir_mounts(
        gw.run_dir, gw.standby_loops().values())


def add_volume(gw: Daemon, images: ImageSet, tmp: Path, volume: str, table: str,
               fmt: str) -> Path:
    image = copy_image(images.path(table, fmt), tmp / f"{volume}.{fmt}")
    ctl_json(gw, "volume", "add", volume, str(image), "--format", fmt)
    return image


@pytest.fixture(scope="module")
def lxc_gatewayd(libvirt_env: LibvirtEnv,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One gatewayd for the module, serving the run dir the session's libvirtd was prepared for."""
    assert libvirt_env.shared_dir == libvirt_env.socket_path.parent / "rootfs"
    with serving_gatewayd(libvirt_env, tmp_path_factory.mktemp("e2e"), PREFIX) as daemon:
        yield daemon


@pytest.fixture
def gw(lxc_gatewayd: Daemon, libvirt_env: LibvirtEnv) -> Iterator[Daemon]:
    """The module's gatewayd; after each test its domains are gone and nothing stays mounted."""
    yield lxc_gatewayd
    for info in domain.list_domains(uri=libvirt_env.uri):
        if str(info["name"]).startswith(PREFIX):
            lxc_gatewayd.ctl("domain", "stop", str(info["name"]))
    for vol in ctl_json(lxc_gatewayd, "volume", "ls"):
        if vol["attachment"] is not None:
            lxc_gatewayd.ctl("umount", vol["name"], "--force")
    leaked = run_dir_mounts(lxc_gatewayd.run_dir, lxc_gatewayd.standby_loops().values())
    assert not leaked, f"leaked after test: {leaked}\n{lxc_gatewayd.log_tail()}"


@pytest.mark.timeout(180)
def test_demo_start_twice_then_stop(libvirt_env: LibvirtEnv, tmp_path: Path) -> None:
    """`make run` / `make stop` (gateway.cli.demo) in temp dirs. It runs before the module's
    gatewayd exists (first test of the file): the demo starts its own on the run dir libvirtd was
    prepared for. libvirtd is the session's, so the demo reuses it and leaves it running."""
    if not (libvirt_env.hook_active and libvirt_env.mounts_visible):
        pytest.skip("a libvirtd was already running: it has no gateway hook")
    run_dir = libvirt_env.socket_path.parent
    if libvirt_env.socket_path.exists():
        pytest.skip("another gatewayd serves the session's run dir; run this test first")
    name = f"{PREFIX}demo"
    argv = [sys.executable, "-m", "gateway.cli.demo", "--state-dir", str(tmp_path / "state"),
            "--run-dir", str(run_dir), "--log", str(tmp_path / "gatewayd.log"),
            "--hooks-dir", str(run_dir / "hooks"), "--domain", name]

    def demo(*extra: str) -> str:
        proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    try:
        first = demo()
        assert "built the demo image" in first
        assert "libvirtd already running; reusing it" in first
        assert "inside e2e-demo: cat /etc/marker -> 'hello from a storage-gateway container'" \
            in first
        second = demo()
        for step in ("demo image", "gatewayd already running", "volume demo already registered",
                     "container e2e-demo already running", "inside e2e-demo"):
            assert step in second, second
        assert read_marker(name) == "hello from a storage-gateway container\n"
    finally:
        stopped = demo("stop")
    assert "container e2e-demo stopped" in stopped
    assert "gatewayd stopped" in stopped
    assert "libvirtd was not started by this demo" in stopped
    assert all(d["name"] != name for d in domain.list_domains(uri=libvirt_env.uri))
    assert not run_dir_mounts(run_dir)
    assert not (run_dir / "gatewayd.pid").exists()
    assert mounts.is_mountpoint(libvirt_env.shared_dir)  # the session's shared dir stays
    assert is_ours(run_dir / "hooks" / "lxc")  # it was there before `make run`: kept


# Each dimension is covered in both modes: qcow2 and raw, partitioned (mbr, gpt) and whole disk.
COMBOS = [("gpt", "qcow2", "bind"), ("none", "raw", "bind"),
          ("mbr", "raw", "fuse"), ("none", "qcow2", "fuse")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("table", "fmt", "mode"), COMBOS,
                         ids=[f"{t}-{f}-{m}" for t, f, m in COMBOS])
def test_domain_start_write_stop(gw: Daemon, image_set: ImageSet, tmp_path: Path, table: str,
                                 fmt: str, mode: str) -> None:
    name, volume = f"{PREFIX}{table}-{fmt}-{mode}", f"v-{table}-{fmt}-{mode}"
    add_volume(gw, image_set, tmp_path, volume, table, fmt)
    started = ctl_json(gw, "domain", "start", name, "--volume", volume, "--mode", mode)
    assert started == {"name": name, "volume": volume, "mode": mode,
                       "rootfs": str(gw.run_dir / "rootfs" / volume)}
    assert attachment(gw, volume)["state"] == "mounted"
    assert {"name": name, "state": "running", "volume": volume, "mode": mode} in ctl_json(
        gw, "domain", "ls")
    assert read_marker(name) == MARKER
    wait_for("the container's init", lambda: enter(name, "/bin/cat", "/run/booted").returncode
             == 0)

    proc = enter(name, "/bin/sh", "-c", f"echo {volume} > /root/f; sync")
    assert proc.returncode == 0, proc.stderr

    stopped = ctl_json(gw, "domain", "stop", name)
    assert stopped == {"name": name, "stopped": True, "volume": volume}
    assert torn_down(gw, volume)
    assert all(d["name"] != name for d in ctl_json(gw, "domain", "ls"))

    # The write reached the image: mount it again through the gateway and look.
    rootfs = Path(ctl_json(gw, "mount", volume, "--mode", mode)["rootfs"])
    try:
        assert (rootfs / "root" / "f").read_text() == f"{volume}\n"
        assert (rootfs / "etc" / "marker").read_text() == MARKER
    finally:
        gw.ctl("umount", volume, check=True)
    assert torn_down(gw, volume)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_killed_init_tears_the_mount_down(gw: Daemon, image_set: ImageSet, tmp_path: Path,
                                          mode: str) -> None:
    name, volume = f"{PREFIX}kill-{mode}", f"v-kill-{mode}"
    add_volume(gw, image_set, tmp_path, volume, "mbr", "qcow2")
    ctl_json(gw, "domain", "start", name, "--volume", volume, "--mode", mode)
    assert read_marker(name) == MARKER
    os.kill(container_init("lxc:///", name)[0], signal.SIGKILL)
    wait_for("the mount to go away", lambda: torn_down(gw, volume))
    assert domain.domain_state(name) == "shutoff"
    assert ctl_json(gw, "domain", "stop", name)["stopped"] is True  # undefines it


@pytest.mark.timeout(90)
def test_plain_virsh_define_and_start_uses_the_hook(gw: Daemon, image_set: ImageSet,
                                                    tmp_path: Path) -> None:
    name, volume = f"{PREFIX}virsh", "v-virsh"
    add_volume(gw, image_set, tmp_path, volume, "gpt", "raw")
    xml = gw.ctl("domain", "xml", name, "--volume", volume, "--mode", "bind", check=True).stdout
    (tmp_path / "dom.xml").write_text(xml)
    virsh("define", str(tmp_path / "dom.xml"))
    try:
        assert attachment(gw, volume) is None  # nothing is mounted before the start
        virsh("start", name)
        record = attachment(gw, volume)
        assert (record["state"], record["mode"]) == ("mounted", "bind")
        assert read_marker(name) == MARKER
        virsh("destroy", name)
        wait_for("the mount to go away", lambda: torn_down(gw, volume))
        assert domain.domain_state(name) == "shutoff"
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)


@pytest.mark.timeout(60)
def test_hook_refusal_fails_virsh_start(gw: Daemon, tmp_path: Path) -> None:
    """gatewayd reachable but the domain names a volume it does not know."""
    name = f"{PREFIX}unknown"
    rootfs = gw.run_dir / "rootfs" / "no-such-volume"
    (tmp_path / "dom.xml").write_text(domain.domain_xml(name, str(rootfs), "no-such-volume",
                                                        "bind"))
    virsh("define", str(tmp_path / "dom.xml"))
    try:
        proc = virsh("start", name, check=False)
        assert proc.returncode != 0
        assert "storage-gateway hook: gatewayd refused mount:" in proc.stderr
        assert "(not-found)" in proc.stderr
        assert domain.domain_state(name) == "shutoff"
    finally:
        virsh("undefine", name, check=False)


@pytest.mark.timeout(90)
def test_release_host_view(gw: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    name, volume = f"{PREFIX}hostview", "v-hostview"
    add_volume(gw, image_set, tmp_path, volume, "gpt", "qcow2")
    ctl_json(gw, "domain", "start", name, "--volume", volume, "--release-host-view")
    host_path = gw.run_dir / "rootfs" / volume
    assert not mounts.is_mountpoint(host_path)  # the host no longer sees the rootfs
    assert not mounts.is_mountpoint(gw.run_dir / "mnt" / volume)  # nor the kernel mount
    assert attachment(gw, volume)["state"] == "mounted"
    assert read_marker(name) == MARKER  # the container kept it
    proc = enter(name, "/bin/sh", "-c", "echo kept > /root/g; sync")
    assert proc.returncode == 0, proc.stderr
    assert ctl_json(gw, "domain", "stop", name)["stopped"] is True
    wait_for("the mount to go away", lambda: torn_down(gw, volume))
    rootfs = Path(ctl_json(gw, "mount", volume)["rootfs"])
    try:
        assert (rootfs / "root" / "g").read_text() == "kept\n"
    finally:
        gw.ctl("umount", volume, check=True)


@pytest.mark.timeout(90)
def test_hook_latency(gw: Daemon, image_set: ImageSet, tmp_path: Path,
                      record_property: Callable[[str, object], None]) -> None:
    """What the hook adds to a start: run the installed hook as libvirtd does (prepare with the
    domain XML on stdin). Cold = gatewayd really mounts; warm = the volume is already mounted.
    Figures only, no assertions on speed."""
    hook = gw.run_dir / "hooks" / "lxc"
    volume = "v-latency"
    add_volume(gw, image_set, tmp_path, volume, "gpt", "qcow2")
    xml = domain.domain_xml(f"{PREFIX}latency", str(gw.run_dir / "rootfs" / volume), volume,
                            "bind").encode()

    def call(op: str) -> float:
        t = time.perf_counter()
        proc = subprocess.run([str(hook), f"{PREFIX}latency", op, "begin", "-"], input=xml,
                              capture_output=True, timeout=60)
        elapsed = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr.decode()
        return elapsed

    cold, warm, release = [], [], []
    for _ in range(3):
        cold.append(call("prepare"))
        assert attachment(gw, volume)["state"] == "mounted"
        warm.append(call("prepare"))
        release.append(call("release"))
        assert torn_down(gw, volume)
    t = time.perf_counter()
    subprocess.run(["/usr/bin/python3", "-IS", "-c", "pass"], check=True)
    bare = time.perf_counter() - t

    # The same through libvirt: `virsh start` while the hook mounts (cold) and while the volume
    # is already mounted (warm: the hook only asks).
    name = f"{PREFIX}latency"
    (tmp_path / "dom.xml").write_bytes(xml)
    virsh("define", str(tmp_path / "dom.xml"))
    starts: dict[str, list[float]] = {"cold": [], "warm": []}
    try:
        for _ in range(2):
            for kind in ("cold", "warm"):
                if kind == "warm":
                    gw.ctl("mount", volume, check=True)
                t = time.perf_counter()
                virsh("start", name)
                starts[kind].append(time.perf_counter() - t)
                virsh("destroy", name)
                wait_for("the mount to go away", lambda: torn_down(gw, volume))
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
    figures = {"hook_cold_ms": round(min(cold) * 1000, 1),
               "hook_warm_ms": round(min(warm) * 1000, 1),
               "hook_release_ms": round(min(release) * 1000, 1),
               "python_startup_ms": round(bare * 1000, 1),
               "virsh_start_cold_ms": round(min(starts["cold"]) * 1000, 1),
               "virsh_start_warm_ms": round(min(starts["warm"]) * 1000, 1)}
    record_property("hook_latency", figures)
    print(f"hook latency: {figures}")
