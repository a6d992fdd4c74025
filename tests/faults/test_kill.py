"""kill -9 of each moving part while a writer fsyncs files through the mounted rootfs.

Scenarios (raw whole-disk ext4 images, so e2fsck runs on the image file itself):
  gatewayd-kill, gatewayd-term (bind and fuse mode): gatewayd is killed (kill -9) or stopped
               (SIGTERM, as an upgrade does). The data plane (block view, loop device, kernel
               mount or fuse2fs, qemu-storage-daemon) does not depend on it: the writer must go on
               while gatewayd is away, and a new gatewayd adopts the attachment.
  qsd          bind mode: qemu-storage-daemon dies; gatewayd restarts it, re-adds the export and
               the data plane reconnects; the mount stays and the writer must make progress again.
  fuse2fs      fuse mode: fuse2fs dies; gatewayd notices (pidfd) and tears its mount down.

After each: status healthy, every fsynced write present (read back through a fresh mount in the
same mode: bind replays the ext4 journal in the kernel; fuse mode makes the gateway run
`e2fsck -f -y` first, because fuse2fs has no journal and a crash loses its in-memory bitmaps),
`e2fsck -fn` clean, no leftovers; gatewayd's fd count must not grow across cycles where gatewayd
survives. SOAK_CYCLES (default 1) cycles per scenario.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.host import fuse2fs
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image
from tests.faults.harness import (
    CYCLES,
    CycleReport,
    Writer,
    fsck_clean,
    gatewayd_fds,
    healthy,
    leaks,
    status,
    verify_data,
    wait_for,
)

pytestmark = pytest.mark.timeout(90 + 60 * CYCLES)
VOL = "victim"


@pytest.fixture
def rig(tmp_path: Path, image_set: ImageSet) -> Iterator[tuple[Daemon, Path]]:
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "gatewayd.log", extra_args=["--libvirt-uri", ""])
    image = copy_image(image_set.path("none", "raw"), tmp_path / "victim.raw")
    daemon.start()
    try:
        daemon.ctl("volume", "add", VOL, str(image), "--format", "raw", check=True)
        yield daemon, image
    finally:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.proc = None
            daemon.start()  # reconcile whatever a failed cycle left
        daemon.ctl("umount", VOL, "--force")
        daemon.stop()
        assert daemon.cleanup() == []


def run_cycle(daemon: Daemon, image: Path, tmp: Path, scenario: str, mode: str,
              cycle: int) -> CycleReport:
    report = CycleReport(f"{scenario}-{mode}", cycle)
    daemon.ctl("mount", VOL, "--mode", mode, check=True)
    rel = f"w{cycle}"
    writer = Writer(daemon.run_dir / "rootfs" / VOL / rel, tmp / f"ack-{scenario}-{cycle}")
    writer.start()
    try:
        writer.wait_acks(5)
        if scenario in ("gatewayd-kill", "gatewayd-term"):
            sig = signal.SIGKILL if scenario == "gatewayd-kill" else signal.SIGTERM
            daemon.stop(sig, everything=False)
            away = time.monotonic()
            writer.wait_acks(len(writer.acked()) + 5)  # I/O goes on without gatewayd
            t = time.monotonic()
            daemon.start()
            report.recovery_s = time.monotonic() - t + wait_for("healthy", lambda: healthy(daemon))
            rec = status(daemon)["reconcile"]
            report.extra = {"found": rec["found"], "adopted": rec["adopted"],
                            "away_s": round(t - away, 3)}
            assert rec["adopted"] == [VOL] and rec["found"] == 0, rec
            assert status(daemon)["mounts"] == 1
            writer.wait_acks(len(writer.acked()) + 3)  # and after the adoption
            writer.stop()
            daemon.ctl("umount", VOL, check=True)
        elif scenario == "qsd":
            before = status(daemon)["qsd"]
            os.kill(before["pid"], signal.SIGKILL)
            t = time.monotonic()
            acks = len(writer.acked())
            wait_for("qsd restart", lambda: (status(daemon).get("qsd") or {}).get(
                "restarts", 0) > before["restarts"] and healthy(daemon))
            writer.wait_acks(acks + 3)  # I/O through the mount resumes
            report.recovery_s = time.monotonic() - t
            writer.stop()
            assert status(daemon)["mounts"] == 1
            daemon.ctl("umount", VOL, check=True)
        elif scenario == "fuse2fs":
            (pid,) = fuse2fs.processes_under(daemon.run_dir / "rootfs" / VOL)
            os.kill(pid, signal.SIGKILL)
            t = time.monotonic()
            wait_for("mount torn down", lambda: status(daemon).get("mounts") == 0)
            report.recovery_s = time.monotonic() - t
            writer.stop()
        else:
            raise AssertionError(scenario)
    finally:
        writer.stop()
    assert healthy(daemon)
    acked = writer.acked()
    report.stall_s = round(writer.max_stall(), 3)
    # The remount replays (bind) or preens after the lost fuse2fs (fuse), as a boot would.
    report.acked = verify_data(daemon, VOL, rel, acked, mode)
    report.extra["fsck"] = fsck_clean(image)
    report.leaks = leaks(daemon, VOL)
    report.gatewayd_fds = gatewayd_fds(daemon)
    report.emit()
    assert report.leaks == []
    return report


@pytest.mark.parametrize("scenario,mode", [
    ("gatewayd-kill", "fuse"), ("gatewayd-kill", "bind"), ("gatewayd-term", "fuse"),
    ("gatewayd-term", "bind"), ("qsd", "bind"), ("fuse2fs", "fuse")])
def test_kill_under_writes(rig: tuple[Daemon, Path], tmp_path: Path, scenario: str,
                           mode: str) -> None:
    daemon, image = rig
    reports = [run_cycle(daemon, image, tmp_path, scenario, mode, c) for c in range(CYCLES)]
    assert all(r.acked >= 5 for r in reports)
    if scenario in ("qsd", "fuse2fs") and len(reports) > 2:
        # gatewayd survived every cycle: its fd count must not grow (allow a little jitter)
        assert reports[-1].gatewayd_fds <= reports[1].gatewayd_fds + 2, [
            r.gatewayd_fds for r in reports]
