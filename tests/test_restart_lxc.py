"""Issue 16: containers outlive gatewayd. A real libvirtd container appends numbered, fsynced
lines to its rootfs while gatewayd is stopped (SIGTERM), killed (kill -9) or replaced by another
checkout of the code, and while qemu-storage-daemon is killed; nothing inside may notice.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.libvirt import domain
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image
from tests.libvirt_env import LibvirtEnv, libvirt_env

__all__ = ["libvirt_env"]  # the session fixture

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "e2e-rst-"
GAP = 3.0
# The container's init: line i is "i UPTIME", appended and fsynced; a failure is written down.
# A sync that dies of a signal (exit status above 128) is `domain stop` ending the container,
# which signals every process in it but its init: not an I/O error.
WRITER = ("i=0; while :; do i=$((i+1)); read up rest < /proc/uptime; "
          "echo \"$i $up\" >> /root/lines || echo \"write $i\" >> /root/errors; "
          "out=$(sync -d /root/lines 2>&1); rc=$?; [ $rc -eq 0 ] || [ $rc -gt 128 ] || "
          "echo \"sync $i $rc $out\" >> /root/errors; sleep 0.05; done")


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-q", "-c", "lxc:///", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def inside(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return virsh("lxc-enter-namespace", name, "--noseclabel", *argv, check=False)


def lines_inside(name: str) -> int:
    """The writer's last line number, seen from inside the container (0 while its init is not
    there yet or has written nothing)."""
    proc = inside(name, "/bin/sh", "-c", "tail -n 1 /root/lines")
    if proc.returncode != 0 and "Init pid is not yet available" in proc.stderr:
        return 0
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[0]) if proc.stdout.strip() else 0


def ctl_json(gw: Daemon, *args: str) -> Any:
    return json.loads(gw.ctl(*args, "--json", check=True).stdout)


def wait_for(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def other_checkout(tmp: Path) -> Path:
    """A second copy of the code (the stand-in for an upgrade): the gateway package, with its
    built native probe, in a directory of its own, whose catalog schema has one migration more
    (so the upgrade migrates the catalog under live attachments)."""
    target = tmp / "checkout"
    shutil.copytree(ROOT / "gateway", target / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    catalog = target / "gateway" / "catalog.py"
    text = catalog.read_text()
    assert "\nSCHEMA_VERSION = len(MIGRATIONS)\n" in text
    catalog.write_text(text.replace(
        "\nSCHEMA_VERSION = len(MIGRATIONS)\n",
        "\nMIGRATIONS = (*MIGRATIONS, 'CREATE TABLE upgrade_probe (note TEXT);')\n"
        "SCHEMA_VERSION = len(MIGRATIONS)\n"))
    return target


@pytest.fixture
def base(libvirt_env: LibvirtEnv, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if not (libvirt_env.hook_active and libvirt_env.mounts_visible):
        pytest.skip("a libvirtd was already running: it has no gateway hook")
    run_dir = libvirt_env.socket_path.parent
    if libvirt_env.socket_path.exists():
        pytest.skip("another gatewayd serves the session's run dir")
    yield run_dir, tmp_path
    for info in domain.list_domains(uri=libvirt_env.uri):
        if str(info["name"]).startswith(PREFIX):
            domain.stop_domain(str(info["name"]), uri=libvirt_env.uri)


def daemon(run_dir: Path, tmp: Path, env: dict[str, str] | None = None) -> Daemon:
    return Daemon(state_dir=tmp / "state", run_dir=run_dir, log_path=tmp / "gatewayd.log",
                  extra_args=["--libvirt-uri", "lxc:///"], env=env or {})


def shut_down(gw: Daemon) -> None:
    """Stop gatewayd and the whole data plane, then require nothing left."""
    gw.ctl("shutdown", "--all", "--force", check=True)
    assert gw.proc is not None
    assert gw.proc.wait(60) == 0, gw.log_tail()
    gw.proc = None
    leaked = [item for item in gw.leftovers()
              if not item.endswith(f"mount {gw.run_dir / 'rootfs'}")]
    assert not leaked, leaked


def start_writer(gw: Daemon, image_set: ImageSet, tmp: Path, name: str, mode: str) -> Path:
    image = copy_image(image_set.path("gpt", "qcow2"), tmp / "vol.qcow2")
    gw.ctl("volume", "add", "rst", str(image), "--format", "qcow2", check=True)
    gw.ctl("domain", "start", name, "--volume", "rst", "--mode", mode, "--init", "/bin/sh",
           "--arg=-c", "--arg", WRITER, check=True)
    wait_for("the writer", lambda: lines_inside(name) >= 5)
    return image


def check_lines(gw: Daemon, at_least: int) -> list[float]:
    """After the domain is gone: mount the volume, require lines 1..N (N >= at_least) and no
    error; returns the writer's timestamps."""
    rootfs = Path(gw.ctl("mount", "rst", check=True).stdout.strip())
    try:
        assert not (rootfs / "root" / "errors").exists(), (rootfs / "root" / "errors").read_text()
        rows = [line.split() for line in (rootfs / "root" / "lines").read_text().splitlines()]
    finally:
        gw.ctl("umount", "rst", check=True)
    numbers = [int(r[0]) for r in rows if len(r) == 2]
    assert numbers == list(range(1, len(numbers) + 1)), "lines lost or torn"
    assert len(numbers) >= at_least, (len(numbers), at_least)
    return [float(r[1]) for r in rows if len(r) == 2]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
@pytest.mark.parametrize("how", ["sigterm", "kill", "upgrade"])
def test_a_container_keeps_its_rootfs_while_gatewayd_is_away(
        base: tuple[Path, Path], image_set: ImageSet, mode: str, how: str) -> None:
    run_dir, tmp = base
    name = f"{PREFIX}{how}-{mode}"
    gw = daemon(run_dir, tmp)
    gw.start()
    try:
        start_writer(gw, image_set, tmp, name, mode)
        schema = ctl_json(gw, "status")["catalog_schema"]
        assert gw.stop(signal.SIGKILL if how == "kill" else signal.SIGTERM,
                       everything=False) in (0, -9)
        seen = [lines_inside(name)]
        deadline = time.monotonic() + GAP
        while time.monotonic() < deadline:
            time.sleep(0.5)
            assert inside(name, "/bin/cat", "/etc/marker").stdout == MARKER
            seen.append(lines_inside(name))
        assert seen[-1] > seen[0], f"the writer stalled while gatewayd was away: {seen}"
        if how == "upgrade":
            code = other_checkout(tmp)
            gw = daemon(run_dir, tmp, env={"PYTHONPATH": str(code)})
        gw.start()
        assert ctl_json(gw, "status")["catalog_schema"] == schema + (how == "upgrade")
        listed = {d["name"]: d for d in ctl_json(gw, "domain", "ls")}
        assert listed[name]["state"] == "running" and listed[name]["volume"] == "rst"
        shown = ctl_json(gw, "volume", "show", "rst")
        assert shown["attachment"]["mode"] == mode and shown["attachment"]["state"] in (
            "mounted", "adopted")
        acked = lines_inside(name)
        assert ctl_json(gw, "domain", "stop", name)["stopped"] is True
        wait_for("the mount to go", lambda: ctl_json(gw, "volume", "show", "rst")[
            "attachment"] is None)
        check_lines(gw, acked)
        gw.ctl("volume", "rm", "rst", check=True)
    finally:
        if gw.proc is None:
            gw.start()
        shut_down(gw)


@pytest.mark.timeout(180)
def test_a_domain_destroyed_while_gatewayd_is_down_loses_its_mount_at_start(
        base: tuple[Path, Path], image_set: ImageSet) -> None:
    run_dir, tmp = base
    name = f"{PREFIX}gone"
    gw = daemon(run_dir, tmp)
    gw.start()
    try:
        start_writer(gw, image_set, tmp, name, "bind")
        assert gw.stop(signal.SIGKILL) in (0, -9)
        virsh("destroy", name)  # still defined, no longer running
        gw.start()
        wait_for("the orphan mount to go",
                 lambda: ctl_json(gw, "volume", "show", "rst")["attachment"] is None)
        check_lines(gw, 5)
        gw.ctl("volume", "rm", "rst", check=True)
    finally:
        if gw.proc is None:
            gw.start()
        shut_down(gw)


@pytest.mark.timeout(180)
def test_qsd_kill_9_is_a_short_stall_inside(base: tuple[Path, Path],
                                            image_set: ImageSet) -> None:
    run_dir, tmp = base
    name = f"{PREFIX}qsd"
    gw = daemon(run_dir, tmp)
    gw.start()
    try:
        start_writer(gw, image_set, tmp, name, "bind")
        qsd = int((run_dir / "qsd.pid").read_text())
        os.kill(qsd, signal.SIGKILL)
        wait_for("QSD to be back", lambda: ctl_json(gw, "status")["qsd"]["restarts"] >= 1)
        before = lines_inside(name)
        wait_for("the writer to go on", lambda: lines_inside(name) > before + 10)
        acked = lines_inside(name)
        assert ctl_json(gw, "domain", "stop", name)["stopped"] is True
        wait_for("the mount to go", lambda: ctl_json(gw, "volume", "show", "rst")[
            "attachment"] is None)
        stamps = check_lines(gw, acked)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        stall = max(gaps)
        print(f"largest write stall across a QSD kill -9: {stall:.2f} s", file=sys.stderr)
        assert stall < 1.0 + 0.1, f"largest stall {stall:.2f} s"
        gw.ctl("volume", "rm", "rst", check=True)
    finally:
        shut_down(gw)
