"""Issue 16, data-plane faults: kill -9 of the data-plane process under a real gatewayd.

Its blast radius is every volume it served. Mounted rootfs lose their block view (I/O on them
fails), gatewayd reports the death with the volumes lost, tears those attachments down, starts a
new data plane and reopens the exports; the volumes mount again with every write acknowledged
before the kill, and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.attach import attachment
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image

pytestmark = pytest.mark.timeout(180)


def status(daemon: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(daemon.ctl("status", "--json", check=True).stdout)
    return result


def wait_for(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def test_kill_9_of_the_data_plane_is_reported_torn_down_and_recovered(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    for name in ("b", "f", "e"):
        image = copy_image(image_set.path("none", "raw"), tmp_path / f"{name}.raw")
        gatewayd.ctl("volume", "add", name, str(image), "--format", "raw", check=True)
    rootfs = {name: Path(gatewayd.ctl("mount", name, "--mode", mode, check=True).stdout.strip())
              for name, mode in (("b", "bind"), ("f", "fuse"))}
    gatewayd.ctl("export", "e", check=True)
    for name, root in rootfs.items():
        write_synced(root / "root" / "before", f"{name} acknowledged before the kill\n")
    held = open(rootfs["b"] / "root" / "held", "w")  # a container's open file on the rootfs

    before = status(gatewayd)
    assert before["dataplane"]["deaths"] == 0 and before["mounts"] == 2
    pid = before["dataplane"]["pid"]
    os.kill(pid, signal.SIGKILL)

    # What a container sees: its rootfs has lost its block device; a synced write fails.
    with held, pytest.raises(OSError):
        held.write("after the kill\n" * 1024)
        held.flush()
        os.fsync(held.fileno())

    wait_for("the data plane's recovery", lambda: (
        status(gatewayd)["dataplane"]["last_death"] or {}).get("recovered_s") is not None)
    after = status(gatewayd)
    death = after["dataplane"]["last_death"]
    assert death["pid"] == pid
    assert death["lost"] == ["b", "e", "f"]  # the blast radius: every volume it served
    assert death["torn_down"] == ["b", "f"]
    assert after["dataplane"]["deaths"] == 1 and after["dataplane"]["pid"] != pid
    assert after["mounts"] == 0 and after["healthy"] is True
    assert after["components"]["dataplane-watcher"]["failures"] == 0
    for name in ("b", "f"):
        shown = json.loads(gatewayd.ctl("volume", "show", name, "--json", check=True).stdout)
        assert shown["attachment"] is None or shown["attachment"]["state"] != "mounted", shown
        assert attachment.leftovers(gatewayd.run_dir, name,
                                    keep=gatewayd.standby_loops().get(name)) == []
    shown = json.loads(gatewayd.ctl("volume", "show", "e", "--json", check=True).stdout)
    assert shown["exported"] is True  # reopened on the new data plane
    assert (gatewayd.run_dir / "blk" / "e" / "disk").stat().st_size > 0
    metrics = gatewayd.ctl("metrics", check=True).stdout
    assert "gateway_dataplane_deaths_total 1.0" in metrics

    # The volumes mount again (fuse mode is checked with e2fsck first: fuse2fs keeps no journal)
    # and hold every write acknowledged before the kill.
    for name, mode in (("b", "bind"), ("f", "fuse")):
        root = Path(gatewayd.ctl("mount", name, "--mode", mode, check=True).stdout.strip())
        assert (root / "root" / "before").read_text() == f"{name} acknowledged before the kill\n"
        gatewayd.ctl("umount", name, check=True)
    gatewayd.ctl("unexport", "e", check=True)
