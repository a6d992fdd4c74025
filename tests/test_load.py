"""Load: register, export and mount many volumes at once from many clients, then tear them all
down. LOAD_VOLUMES (default 24; `make soak` uses 100). Reports gatewayd's RSS and fd count at the
peak and `status` latency during the storm (p50/p95/max); asserts no leaks, no speed limits."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.admin.client import call
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image, make_fs_image

VOLUMES = int(os.environ.get("LOAD_VOLUMES", "24"))
pytestmark = pytest.mark.timeout(120 + 6 * VOLUMES)


def proc_figures(pid: int) -> dict[str, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_many_volumes_at_once(tmp_path: Path, image_set: ImageSet) -> None:
    base = make_fs_image(tmp_path / "base.ext4", 16 * 1024 * 1024, image_set.tree)
    images = [copy_image(base, tmp_path / f"v{i:03d}.raw") for i in range(VOLUMES)]
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""])
    daemon.start()
    try:
        storm(daemon, images)
    finally:
        assert daemon.stop() == 0
        assert daemon.cleanup() == []


def each(fn: Callable[[int], None]) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fn, range(VOLUMES)))


def storm(daemon: Daemon, images: list[Path]) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    idle = proc_figures(pid)
    latencies: list[float] = []
    stop = threading.Event()

    def poll_status() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            call(daemon.socket, "status", timeout=60)
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)

    def up(i: int) -> None:
        name = f"v{i:03d}"
        call(daemon.socket, "volume-add", {"name": name, "path": str(images[i]),
                                           "format": "raw"})
        call(daemon.socket, "export", {"name": name})
        call(daemon.socket, "mount", {"name": name, "mode": "bind"})

    def down(i: int) -> None:
        name = f"v{i:03d}"
        # No retry: the loop device lets go of the window file after umount(2) returns (auto-
        # clear, then FUSE RELEASE), and the teardown waits for that release (close_window)
        # instead of failing with "rootfs is open" (issue-8 BUG-5, fixed in gatewayd).
        call(daemon.socket, "umount", {"name": name})
        call(daemon.socket, "unexport", {"name": name})
        call(daemon.socket, "volume-remove", {"name": name})

    poller = threading.Thread(target=poll_status, daemon=True)
    poller.start()
    try:
        t = time.monotonic()
        each(up)
        up_s = time.monotonic() - t
        peak = proc_figures(pid)
        status = call(daemon.socket, "status")
        assert (status["volumes"], status["exports"], status["mounts"]) == (VOLUMES,) * 3
        for i in range(VOLUMES):
            marker = daemon.run_dir / "rootfs" / f"v{i:03d}" / "etc" / "marker"
            assert marker.read_text() == MARKER
        t = time.monotonic()
        each(down)
        down_s = time.monotonic() - t
    finally:
        stop.set()
        poller.join(60)
    status = call(daemon.socket, "status")
    assert (status["volumes"], status["exports"], status["mounts"]) == (0, 0, 0)
    after = proc_figures(pid)
    live = [x for x in daemon.leftovers() if "/mnt/" in x or "/rootfs/" in x
            or x.startswith("loop ")]
    assert live == []
    assert after["fds"] <= idle["fds"] + 4, (idle, after)  # a few are opened lazily, once
    assert latencies
    figures = {
        "volumes": VOLUMES, "up_s": round(up_s, 2), "down_s": round(down_s, 2),
        "idle": idle, "peak": peak, "after": after,
        "status_ms": {"n": len(latencies),
                      "p50": round(statistics.median(latencies) * 1000, 1),
                      "p95": round(percentile(latencies, 0.95) * 1000, 1),
                      "max": round(max(latencies) * 1000, 1)},
    }
    print(json.dumps(figures))
    if os.environ.get("SOAK_REPORT"):
        with open(os.environ["SOAK_REPORT"], "a") as f:
            f.write(json.dumps({"scenario": "load", **figures}) + "\n")
