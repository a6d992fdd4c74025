"""Snapshot benchmark: a 1 GiB volume snapshotted while a libvirt-lxc container writes to it.

    .venv/bin/python -m bench.snapshot [--size 1G] [--fill 0.75] [--out bench/results]
    make bench-snapshot

One run, one host, side by side:

  stall       the container appends a numbered line and fsyncs it every ~10 ms (bind mode).
              A host thread watches the file's size through the rootfs mount every 0.5 ms; the
              largest gap between two observed writes while the snapshot runs is the largest
              write stall the container saw (the freeze, plus whatever the copy costs the
              writer), next to the largest gap before the snapshot (the writer's own rhythm)
              and the freeze the gateway itself measured (FIFREEZE to FITHAW, in the job).
  throughput  `volume snapshot --format raw|qcow2` of the mounted, written volume (the job's
              time, page cache dropped before) against `qemu-img convert -f raw -O raw|qcow2`
              of the same image file (unmounted, page cache dropped before).

The image is an ext4 filesystem of --size whose files fill --fill of it with random data, so
neither copy can skip zeros. Writes OUT/snapshot-latest.json and OUT/snapshot-latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, build_rootfs_tree, make_fs_image

REPO = Path(__file__).resolve().parent.parent
VOLUME = "snapbench"
DOMAIN = f"sgbench-snap-{os.getpid()}"
WRITER = ("i=0; while :; do i=$((i+1)); read up rest < /proc/uptime; "
          "echo \"$i $up\" >> /root/lines; sync -d /root/lines; sleep 0.01; done")
FORMATS = ("raw", "qcow2")
WARMUP_SECONDS = 3.0
POLL_SECONDS = 0.0005
SESSION_LOCK = Path("/run/lock/storage-gateway-libvirt-tests.lock")
LOCK_WAIT_SECONDS = 900.0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def parse_size(text: str) -> int:
    units = {"M": MIB, "G": 1024 * MIB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def build_image(work: Path, size: int, fill: float) -> Path:
    """An ext4 image of `size` bytes: a busybox rootfs plus random files filling `fill` of it."""
    tree = build_rootfs_tree(work / "tree")
    data = tree / "data"
    data.mkdir()
    left = int(size * fill)
    index = 0
    while left > 0:
        chunk = min(left, 64 * MIB)
        with open(data / f"blob{index:03d}", "wb") as f:
            for _ in range(chunk // MIB):
                f.write(os.urandom(MIB))
        left -= chunk
        index += 1
    (work / "images").mkdir()
    image = make_fs_image(work / "images" / "snapbench.raw", size, tree)
    shutil.rmtree(tree)
    return image


class Observer:
    """Polls a file's size from the host; records when each change was seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = -1
        while not self._stop.is_set():
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = -1
            if size != last:
                self.seen.append(time.perf_counter())
                last = size
            time.sleep(POLL_SECONDS)

    def largest_gap(self, start: float, end: float) -> float:
        """The largest time between two observed writes that overlaps [start, end]."""
        times = self.seen
        gaps = [b - a for a, b in itertools.pairwise(times) if b >= start and a <= end]
        return max(gaps) if gaps else 0.0


def ctl_json(daemon: Daemon, *args: str) -> Any:
    out = daemon.ctl(*args, "--json", check=True).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


@contextlib.contextmanager
def libvirt_turn() -> Iterator[None]:
    """libvirtd is one per host: wait for the turn test sessions take on it (tests/
    libvirt_env.py holds the same lock), so the bench neither stops nor reuses theirs."""
    SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError("libvirtd stayed busy with a test session") from None
                time.sleep(1.0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def gateway_with_libvirt(work: Path, extra_args: Sequence[str] = ()) -> Iterator[Daemon]:
    """A gatewayd (with `extra_args`) with the libvirt hook in a private hooks dir, and a
    libvirtd that sees it."""
    from bench.mount_latency import reaches_libvirtd
    from gateway.attach.attachment import prepare_rootfs_root
    from gateway.libvirt import libvirtd
    from gateway.libvirt.hook import install_hook

    daemon = Daemon(state_dir=work / "state", run_dir=work / "run",
                    log_path=work / "gatewayd.log",
                    extra_args=["--libvirt-uri", "lxc:///", *extra_args])
    with libvirt_turn():
        prepare_rootfs_root(daemon.run_dir)
        hooks = work / "hooks"
        hooks.mkdir(exist_ok=True)
        install_hook(hooks, str(daemon.socket))
        handle = libvirtd.ensure_libvirtd([daemon.run_dir / "rootfs"], hooks_dir=hooks)
        try:
            if not handle.owned and not reaches_libvirtd(daemon.run_dir / "rootfs"):
                raise RuntimeError("a libvirtd was already running and mounts under this run "
                                   "dir do not reach it")
            daemon.start()
            try:
                yield daemon
            finally:
                leaked = daemon.cleanup()
                if leaked:
                    print(f"LEAKED: {leaked}", file=sys.stderr)
        finally:
            handle.stop()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = parse_size(args.size)
    print(f"building a {size // MIB} MiB ext4 image ({args.fill:.0%} random data) in {work}",
          flush=True)
    image = build_image(work, size, args.fill)
    results: dict[str, Any] = {"size": size, "fill": args.fill, "snapshot": {}, "convert": {}}
    with gateway_with_libvirt(work) as daemon:
        daemon.ctl("volume", "add", VOLUME, str(image), "--format", "raw", check=True)
        daemon.ctl("domain", "start", DOMAIN, "--volume", VOLUME, "--mode", "bind", "--init",
                   "/bin/sh", "--arg=-c", "--arg", WRITER, check=True)
        lines = daemon.run_dir / "rootfs" / VOLUME / "root" / "lines"
        try:
            with Observer(lines) as seen:
                time.sleep(WARMUP_SECONDS)
                calm = seen.largest_gap(seen.seen[0] if seen.seen else 0.0, time.perf_counter())
                results["writer_gap_before_s"] = calm
                for fmt in FORMATS:
                    drop_caches()
                    start = time.perf_counter()
                    job = ctl_json(daemon, "volume", "snapshot", VOLUME, "--to", f"snap-{fmt}",
                                   "--format", fmt)
                    end = time.perf_counter()
                    lineage = job["result"]["lineage"]
                    results["snapshot"][fmt] = {
                        "job_seconds": job["seconds"], "cli_seconds": end - start,
                        "mib_s": size / MIB / job["seconds"],
                        "freeze_ms": lineage["freeze_ms"], "consistency": lineage["consistency"],
                        "largest_stall_s": seen.largest_gap(start, end),
                        "file_bytes": os.path.getsize(job["result"]["path"])}
                    print(f"  snapshot {fmt}: {job['seconds']:.2f} s, freeze "
                          f"{lineage['freeze_ms']} ms, largest write stall "
                          f"{results['snapshot'][fmt]['largest_stall_s'] * 1000:.1f} ms",
                          flush=True)
                    time.sleep(1.0)
        finally:
            daemon.ctl("domain", "stop", DOMAIN)
        deadline = time.monotonic() + 30
        while ctl_json(daemon, "volume", "show", VOLUME)["attachment"] is not None:
            if time.monotonic() > deadline:
                raise RuntimeError("the container's mount did not go")
            time.sleep(0.1)
        daemon.ctl("unexport", VOLUME, check=True)  # the idle export lets go of the image
        for fmt in FORMATS:
            out = work / f"convert.{fmt}"
            drop_caches()
            start = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(image), str(out)],
                           check=True)
            seconds = time.perf_counter() - start
            results["convert"][fmt] = {"seconds": seconds, "mib_s": size / MIB / seconds,
                                       "file_bytes": out.stat().st_size}
            print(f"  qemu-img convert -O {fmt}: {seconds:.2f} s", flush=True)
            out.unlink()
        for fmt in FORMATS:
            path = ctl_json(daemon, "volume", "show", f"snap-{fmt}")["path"]
            daemon.ctl("volume", "rm", f"snap-{fmt}", check=True)
            Path(path).unlink()
        daemon.ctl("volume", "rm", VOLUME, check=True)
    return results


def markdown(r: dict[str, Any]) -> str:
    head = (f"Snapshot benchmark (`make bench-snapshot`, {r['host']['date']}, kernel "
            f"{r['host']['kernel']}, {r['host']['cpus']} CPUs): a {r['size'] // MIB} MiB raw "
            f"ext4 volume, {r['fill']:.0%} random data, mounted in bind mode while a container "
            f"appends and fsyncs a line every ~10 ms (largest gap between its writes before "
            f"the snapshots: {r['writer_gap_before_s'] * 1000:.1f} ms).\n\n")
    rows = ["| copy | seconds | MiB/s | x qemu-img convert | freeze ms | largest write stall ms "
            "| file MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for fmt in FORMATS:
        s, c = r["snapshot"][fmt], r["convert"][fmt]
        rows.append(f"| volume snapshot --format {fmt} | {s['job_seconds']:.2f} | "
                    f"{s['mib_s']:.0f} | {c['seconds'] / s['job_seconds']:.2f}x | "
                    f"{s['freeze_ms']} | {s['largest_stall_s'] * 1000:.1f} | "
                    f"{s['file_bytes'] / MIB:.0f} |")
        rows.append(f"| qemu-img convert -O {fmt} | {c['seconds']:.2f} | {c['mib_s']:.0f} | "
                    f"1.00x | - | - | {c['file_bytes'] / MIB:.0f} |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="volume size (M or G suffix)")
    ap.add_argument("--fill", type=float, default=0.75, help="share filled with random data")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("snapshot: needs root (libvirtd, mounts, drop_caches)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sg-bench-snap-", dir="/var/tmp"))
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["host"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(), "cpus": os.cpu_count()}
    results["snapshot_over_convert"] = {
        fmt: results["convert"][fmt]["seconds"] / results["snapshot"][fmt]["job_seconds"]
        for fmt in FORMATS}
    results["largest_stall_ms"] = max(s["largest_stall_s"] * 1000
                                      for s in results["snapshot"].values())
    results["median_freeze_ms"] = statistics.median(
        s["freeze_ms"] for s in results["snapshot"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot-latest.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "snapshot-latest.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
