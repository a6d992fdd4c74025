"""Issue 18 end to end: a real libvirtd container appends numbered, fsynced lines to its rootfs
while `volume snapshot` copies that rootfs. The snapshot mounts, is a filesystem e2fsck finds
clean (bind mode: frozen for the instant), and holds a prefix of what the container wrote, at
least every line it had written before the snapshot began; the container goes on writing and
keeps every line.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image
from tests.libvirt_env import LibvirtEnv, libvirt_env, serving_gatewayd

__all__ = ["libvirt_env"]  # the session fixture

PREFIX = "e2e-snap-"
# The container's init: line i is "i UPTIME", appended and fsynced; a failure is written down
# (a sync killed by a signal is `domain stop` ending the container, not an I/O error).
WRITER = ("i=0; while :; do i=$((i+1)); read up rest < /proc/uptime; "
          "echo \"$i $up\" >> /root/lines || echo \"write $i\" >> /root/errors; "
          "out=$(sync -d /root/lines 2>&1); rc=$?; [ $rc -eq 0 ] || [ $rc -gt 128 ] || "
          "echo \"sync $i $rc $out\" >> /root/errors; sleep 0.02; done")


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", "lxc:///", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def lines_inside(name: str) -> int:
    """The number of the container's last line (virsh's entering is retried: it fails now and
    then with "Child process ... unexpected fatal signal", whatever the rootfs)."""
    for _ in range(3):
        proc = virsh("lxc-enter-namespace", name, "--noseclabel", "/bin/sh", "-c",
                     "tail -n 1 /root/lines")
        if proc.returncode == 0:
            return int(proc.stdout.split()[0]) if proc.stdout.strip() else 0
        time.sleep(0.2)
    raise AssertionError(f"cannot enter {name}: {proc.stderr.strip()}")


def ctl_json(gw: Daemon, *args: str) -> Any:
    """A command's JSON answer (a job's: the last of its JSON lines, the finished job)."""
    out = gw.ctl(*args, "--json", check=True).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


def wait_for(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def read_lines(gw: Daemon, volume: str, mode: str) -> str:
    """The volume's /root/lines, read through a gateway mount; no error was written down."""
    rootfs = Path(gw.ctl("mount", volume, "--mode", mode, check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER
        errors = rootfs / "root" / "errors"
        assert not errors.exists(), errors.read_text()
        return (rootfs / "root" / "lines").read_text()
    finally:
        gw.ctl("umount", volume, check=True)


def numbered(text: str) -> list[int]:
    """The numbers of the complete lines; they must run 1..N."""
    rows = [line.split() for line in text.splitlines(keepends=True) if line.endswith("\n")]
    numbers = [int(r[0]) for r in rows]
    assert numbers == list(range(1, len(numbers) + 1)), "lines lost or torn"
    return numbers


@pytest.fixture
def gw(libvirt_env: LibvirtEnv, tmp_path: Path) -> Iterator[Daemon]:
    with serving_gatewayd(libvirt_env, tmp_path, PREFIX, skip_if_served=True) as daemon:
        yield daemon


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_snapshot_while_a_container_writes(gw: Daemon, image_set: ImageSet, tmp_path: Path,
                                           mode: str) -> None:
    name = f"{PREFIX}{mode}"
    image = copy_image(image_set.path("none", "qcow2"), tmp_path / "src.qcow2")
    gw.ctl("volume", "add", "src", str(image), "--format", "qcow2", check=True)
    gw.ctl("domain", "start", name, "--volume", "src", "--mode", mode, "--init", "/bin/sh",
           "--arg=-c", "--arg", WRITER, check=True)
    wait_for("the writer", lambda: lines_inside(name) >= 20)

    before = lines_inside(name)  # written and fsynced before the snapshot began
    job = ctl_json(gw, "volume", "snapshot", "src", "--to", "snap", "--format", "raw")
    after = lines_inside(name)
    lineage = job["result"]["lineage"]
    assert job["state"] == "done" and lineage["snapshot_of"] == "src"
    if mode == "bind":
        assert lineage["consistency"] == "frozen"
        assert isinstance(lineage["freeze_ms"], float)
    else:
        assert lineage["consistency"] == "crash-consistent" and lineage["freeze_ms"] is None
    # the source keeps running
    wait_for("the writer to go on", lambda: lines_inside(name) > after + 20)
    assert virsh("lxc-enter-namespace", name, "--noseclabel", "/bin/cat",
                 "/etc/marker").stdout == MARKER

    snap = Path(ctl_json(gw, "volume", "show", "snap")["path"])
    if mode == "bind":  # frozen: clean as it is; crash-consistent ones are checked at mount
        checked = subprocess.run(["e2fsck", "-fn", str(snap)], capture_output=True, text=True,
                                 timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    taken = read_lines(gw, "snap", mode)  # fuse mode: e2fsck runs first (a crash-consistent fs)

    assert ctl_json(gw, "domain", "stop", name)["stopped"] is True
    wait_for("the mount to go",
             lambda: ctl_json(gw, "volume", "show", "src")["attachment"] is None)
    source = read_lines(gw, "src", "bind")
    kept = numbered(source)
    assert len(kept) > after + 20  # every line, also those written during and after the copy
    assert source.startswith(taken), "the snapshot is not a prefix of what the container wrote"
    assert before <= len(numbered(taken)) <= after
    gw.ctl("volume", "rm", "snap", check=True)
    gw.ctl("volume", "rm", "src", check=True)
