"""Probes per second: the native probe in process vs pyparted vs `blkid -p`, on the same images.

Run: .venv/bin/python -m bench.probe [--seconds N]   (builds its images in a temp directory)
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import parted

from gateway.probe.core import scan_file
from gateway.testing.probe_images import build_probe_images

IMAGES = ("gpt-basic", "mbr-logical", "gpt-multi", "whole-ext4")


def rate(fn: Callable[[], object], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return count / elapsed


def with_parted(path: Path) -> None:
    try:
        disk = parted.newDisk(parted.getDevice(str(path)))
        [p.geometry.start for p in disk.partitions]
    except Exception:
        pass


def with_blkid(path: Path) -> None:
    subprocess.run(["blkid", "-p", str(path)], capture_output=True, check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = build_probe_images(Path(tmp))
        print(f"{'image':<14}{'native/s':>12}{'pyparted/s':>12}{'blkid -p/s':>12}"
              f"{'vs parted':>11}{'reads':>7}")
        for name in IMAGES:
            path = cases[name].path
            native = rate(functools.partial(scan_file, path), args.seconds)
            pyparted = rate(functools.partial(with_parted, path), args.seconds)
            blkid = rate(functools.partial(with_blkid, path), args.seconds)
            print(f"{name:<14}{native:>12.0f}{pyparted:>12.0f}{blkid:>12.0f}"
                  f"{native / pyparted:>10.1f}x{scan_file(path).reads:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
