"""gatewayd's memory over many mounts: RSS_CYCLES (2,000) bind mount/umount cycles of one volume
through the admin socket, with the default export linger (each remount claims the idle export
and its standby loop) and with none (a full export, QMP exchange and NBD connection every
cycle). gatewayd's RSS after the last cycle stays within 2 MiB of its RSS after the first 100.
The figures are printed and appended to SOAK_REPORT when set; no speed is asserted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gateway.admin.client import Client
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image

CYCLES = int(os.environ.get("RSS_CYCLES", "2000"))
WARMUP = 100
LIMIT_KIB = 2048

pytestmark = pytest.mark.timeout(300 + CYCLES // 10)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def helpers(run_dir: Path, exclude: int) -> dict[str, int]:
    """RSS (KiB) of the other processes serving the run dir (QSD, the data plane), by
    program:pid; reported, not asserted (QSD's caches grow with use)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            rss = rss_kib(int(entry.name))
        except (OSError, AssertionError):
            continue
        if any(str(run_dir).encode() in arg for arg in argv):
            found[f"{os.path.basename(argv[0].decode(errors='replace'))}:{entry.name}"] = rss
    return found


@pytest.mark.parametrize("linger", ["10", "0"])
def test_rss_stays_flat_over_mount_cycles(tmp_path: Path, image_set: ImageSet,
                                          linger: str) -> None:
    assert CYCLES > WARMUP
    image = copy_image(image_set.path("gpt", "raw"), tmp_path / "v.raw")
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "gatewayd.log",
                    extra_args=["--libvirt-uri", "", "--export-linger", linger,
                                "--log-level", "warning"])
    daemon.start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        samples: dict[int, int] = {0: rss_kib(pid)}
        others: dict[int, dict[str, int]] = {}
        started = time.monotonic()
        with Client(daemon.socket) as client:
            client.call("volume-add", {"name": "v", "path": str(image), "format": "raw"})
            for cycle in range(1, CYCLES + 1):
                client.call("mount", {"name": "v", "mode": "bind"})
                client.call("umount", {"name": "v"})
                if cycle in (1, WARMUP) or cycle % 250 == 0 or cycle == CYCLES:
                    samples[cycle] = rss_kib(pid)
                if cycle in (WARMUP, CYCLES):
                    others[cycle] = helpers(daemon.run_dir, pid)
            client.call("volume-remove", {"name": "v"})
        seconds = time.monotonic() - started
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        assert daemon.cleanup() == []
    growth = samples[CYCLES] - samples[WARMUP]
    figures = {"scenario": "rss", "linger": float(linger), "cycles": CYCLES,
               "rss_kib": samples, "growth_after_warmup_kib": growth,
               "bytes_per_cycle": round(growth * 1024 / (CYCLES - WARMUP)),
               "other_processes_rss_kib": others, "seconds": round(seconds, 1)}
    print(json.dumps(figures))
    if os.environ.get("SOAK_REPORT"):
        with open(os.environ["SOAK_REPORT"], "a") as f:
            f.write(json.dumps(figures) + "\n")
    assert growth <= LIMIT_KIB, (f"gatewayd grew {growth} KiB from cycle {WARMUP} to "
                                 f"{CYCLES}: {samples}")
