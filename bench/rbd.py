"""RBD volumes against local files, in one run: mount latency, fio through the block view, and
the takeover time between two hosts.

    .venv/bin/python -m bench.rbd [--runs 5] [--fio-runtime 3] [--fio-mib 128] [--lease 4]
                                  [--out bench/results]
    make bench-rbd

A throw-away Ceph cluster (gateway/testing/ceph.py: one monitor, one memstore OSD on 127.0.0.1)
and two gatewayd processes (hosts A and B, their own state and run dirs) under one temp dir.

- Mount latency (bind mode, through the admin socket, no gatewayctl start-up): the same GPT +
  ext4 disk as a local raw file and as an RBD image. Cold: the export is made by the mount
  (the idle export closed before each run); warm: a remount while the export lingers.
- fio (bench/fio_table.fio) on RUN_DIR/blk/VOL/disk of an exported volume filled with random
  data: 4 KiB random and 1 MiB sequential reads and writes, iodepth 1 and 32.
- Takeover: host A mounts an RBD volume and writes; every process of A is killed (-9); host B
  retries its mount until A's writer lease lapses, fences A and writes a file with fsync: the
  time from the kill to that fsync's return.

Writes rbd-latest.md (and rbd-latest.json) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import fio_table
from gateway.admin.client import Client
from gateway.testing import ceph
from gateway.testing.ceph import Cluster
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, build_rootfs_tree, make_disk, make_fs_image

KINDS = ("local file", "rbd")


@contextmanager
def host(top: Path, name: str, lease: float) -> Iterator[Daemon]:
    (top / name).mkdir()
    daemon = Daemon(state_dir=top / name / "state", run_dir=top / name / "run",
                    log_path=top / name / "gatewayd.log",
                    extra_args=["--libvirt-uri", "", "--log-level", "info", "--host-id", name,
                                "--lease-seconds", str(lease), "--ceph-timeout", "5"])
    try:
        daemon.start()
        yield daemon
    finally:
        leaked = daemon.cleanup()
        if leaked:
            print(f"left behind by {name}'s gatewayd: {leaked}", file=sys.stderr)


def add(client: Client, cluster: Cluster, name: str, kind: str, source: Path) -> None:
    """Register `source` as a local raw volume or, imported first, as an RBD volume."""
    if kind == "rbd":
        spec = cluster.import_image(source, name)
        client.call("volume-add-rbd", {"name": name, "rbd": spec, "ceph_conf": str(cluster.conf),
                                       "format": "raw"})
    else:
        client.call("volume-add", {"name": name, "path": str(source), "format": "raw"})


def timed(client: Client, op: str, args: dict[str, Any]) -> float:
    began = time.perf_counter()
    client.call(op, args)
    return time.perf_counter() - began


def mount_latency(client: Client, name: str, runs: int) -> dict[str, float]:
    """Median seconds of a cold and of a warm bind mount."""
    cold, warm = [], []
    for _ in range(runs):
        client.call("unexport", {"name": name})  # closes the lingering export: cold again
        cold.append(timed(client, "mount", {"name": name, "mode": "bind"}))
        client.call("umount", {"name": name})
        warm.append(timed(client, "mount", {"name": name, "mode": "bind"}))
        client.call("umount", {"name": name})
    client.call("unexport", {"name": name})
    return {"cold": statistics.median(cold), "warm": statistics.median(warm)}


def random_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(random.randbytes(MIB))
    return path


def fio_rows(client: Client, run_dir: Path, name: str, size: int, runtime: float
             ) -> list[dict[str, Any]]:
    client.call("export", {"name": name})
    try:
        disk = run_dir / "blk" / name / "disk"
        direct = fio_table.direct_ok(disk)
        rows = []
        for label, rw, bs, figure in fio_table.WORKLOADS:
            for depth in fio_table.DEPTHS:
                value = fio_table.fio(disk, rw, bs, depth, runtime, size, direct)[figure]
                rows.append({"workload": label, "depth": depth, "figure": figure,
                             "value": value})
                print(f"  {name:<10} {label:<24} qd{depth:<3} {value:9.0f} {figure}",
                      flush=True)
        return rows
    finally:
        client.call("unexport", {"name": name})


def kill_host(daemon: Daemon) -> None:
    """kill -9 of gatewayd, then of its data plane and qemu-storage-daemon."""
    daemon.kill()
    for item in daemon.leftovers():
        if item.startswith("process "):
            try:
                os.kill(int(item.split()[1].rstrip(":")), signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_synced(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"written\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def takeover(a: Daemon, b: Daemon, cluster: Cluster, disk: Path, lease: float) -> float:
    """Seconds from kill -9 of every host-A process to host B's first fsynced write."""
    spec = cluster.import_image(disk, "takeover")
    for daemon in (a, b):
        daemon.ctl("volume", "add", "takeover", "--rbd", spec, "--ceph-conf",
                   str(cluster.conf), "--format", "raw", check=True)
    rootfs = Path(a.ctl("mount", "takeover", check=True).stdout.strip())
    write_synced(rootfs / "etc" / "from-a")
    kill_host(a)
    killed = time.monotonic()
    while True:
        done = b.ctl("mount", "takeover")
        if done.returncode == 0:
            break
        if time.monotonic() - killed > lease + 30:
            raise RuntimeError(f"host B never took over: {done.stderr}")
        time.sleep(0.05)
    write_synced(Path(done.stdout.strip()) / "etc" / "from-b")
    took = time.monotonic() - killed
    b.ctl("umount", "takeover", check=True)
    a.start()  # reconciles what the killed processes left (and finds itself fenced)
    return took


def markdown(results: dict[str, Any]) -> str:
    lat = results["mount"]
    lines = [f"RBD against local file (`make bench-rbd`, bench/rbd.py, {results['date']}, "
             f"{os.cpu_count()} CPUs): one memstore OSD on 127.0.0.1, bind mode, median of "
             f"{results['runs']} mounts; fio {results['fio_runtime']:g} s per job on "
             f"{results['fio_mib']} MiB of random data through RUN_DIR/blk/VOL/disk.", "",
             "| measure | local file | rbd | rbd / local |", "|---|---:|---:|---:|"]
    for phase in ("cold", "warm"):
        local, rbd = lat["local file"][phase] * 1000, lat["rbd"][phase] * 1000
        lines.append(f"| mount latency, {phase} (ms) | {local:.1f} | {rbd:.1f} | "
                     f"{rbd / local:.2f}x |")
    by_kind = {kind: {(r["workload"], r["depth"]): r for r in results["fio"][kind]}
               for kind in KINDS}
    for (label, depth), row in by_kind["local file"].items():
        unit = "IOPS" if row["figure"] == "iops" else "MiB/s"
        local, rbd = row["value"], by_kind["rbd"][(label, depth)]["value"]
        lines.append(f"| fio {label}, qd{depth} ({unit}) | {local:.0f} | {rbd:.0f} | "
                     f"{rbd / local:.2f}x |")
    lines.append(f"| takeover: kill -9 of host A to host B's first fsynced write (s), "
                 f"lease {results['lease']:g} s | - | {results['takeover_s']:.2f} | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="mounts per latency figure")
    ap.add_argument("--fio-runtime", type=float, default=3.0, help="seconds per fio job")
    ap.add_argument("--fio-mib", type=int, default=128, help="size of the fio volumes")
    ap.add_argument("--lease", type=float, default=4.0, help="writer lease of the hosts (s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write rbd-latest.md and rbd-latest.json there (default: print only)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.rbd: needs root (FUSE, loop devices, mounts)", file=sys.stderr)
        return 2
    missing = [t for t in ("ceph-mon", "ceph-osd", "rbd", "fio") if shutil.which(t) is None]
    if missing:
        print(f"bench.rbd: {', '.join(missing)} missing (make setup)", file=sys.stderr)
        return 2
    top = Path(tempfile.mkdtemp(prefix="sg-bench-rbd-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "runs": args.runs,
                               "fio_runtime": args.fio_runtime, "fio_mib": args.fio_mib,
                               "lease": args.lease, "mount": {}, "fio": {}}
    try:
        with ExitStack() as stack:
            cluster = stack.enter_context(ceph.running(top / "ceph"))
            a = stack.enter_context(host(top, "host-a", args.lease))
            b = stack.enter_context(host(top, "host-b", args.lease))
            images = top / "images"
            images.mkdir()
            fs = make_fs_image(images / "rootfs.ext4", 32 * MIB,
                               build_rootfs_tree(images / "tree"))
            disk = make_disk(images / "disk.raw", fs, "gpt")
            size = args.fio_mib * MIB
            with Client(a.socket) as client:
                for kind in KINDS:
                    local = images / f"mount-{kind[0]}.raw"
                    shutil.copyfile(disk, local)
                    name = f"mount-{kind[0]}"
                    add(client, cluster, name, kind, local)
                    results["mount"][kind] = mount_latency(client, name, args.runs)
                    print(f"  {kind:<10} mount cold {results['mount'][kind]['cold'] * 1000:.1f}"
                          f" ms, warm {results['mount'][kind]['warm'] * 1000:.1f} ms",
                          flush=True)
                    data = random_disk(images / f"fio-{kind[0]}.raw", size)
                    name = f"fio-{kind[0]}"
                    add(client, cluster, name, kind, data)
                    results["fio"][kind] = fio_rows(client, a.run_dir, name, size,
                                                    args.fio_runtime)
                    client.call("volume-remove", {"name": name})
                    data.unlink()
            results["takeover_s"] = takeover(a, b, cluster, disk, args.lease)
            print(f"  takeover {results['takeover_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    table = markdown(results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rbd-latest.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "rbd-latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
