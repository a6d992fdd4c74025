"""Data-plane throughput: fio on the block view's disk file against nbdfuse's, on one QSD export.

    .venv/bin/python -m bench.fio_table [--runtime 5] [--size-mib 256] [--out DIR] [--smoke]
    make bench-fio      (also a section of `make bench`: bench/mount_latency.py --only fio)

One qcow2 volume filled with random data (every cluster allocated, so writes overwrite) is
exported by gatewayd's qemu-storage-daemon. The block view serves it as RUN_DIR/blk/VOL/disk,
and nbdfuse (writable, its default options) connects to the same export. fio then runs 4 KiB
random reads and writes and 1 MiB sequential reads and writes at iodepth 1 and 32 (libaio,
O_DIRECT where the file accepts it) on each file in turn, the order swapped between rows, each
for a short fixed time. The table gives IOPS (random) or MiB/s (sequential) and the ratio block
view / nbdfuse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import bench_report, mount_baselines, scratch
from gateway.admin.client import Client
from gateway.testing.images import MIB, to_qcow2

VOLUME = "fio"
# (label, fio --rw, --bs, figure reported)
WORKLOADS = (("4K random read", "randread", "4k", "iops"),
             ("4K random write", "randwrite", "4k", "iops"),
             ("1 MiB sequential read", "read", "1m", "mib_s"),
             ("1 MiB sequential write", "write", "1m", "mib_s"))
DEPTHS = (1, 32)
READERS = ("block view", "nbdfuse")


class FioError(RuntimeError):
    pass


def make_image(work: Path, size: int) -> Path:
    raw = work / "fio.raw"
    with open(raw, "wb") as f:
        for _ in range(size // MIB):
            f.write(random.randbytes(MIB))
    image = to_qcow2(raw, work / "fio.qcow2")
    raw.unlink()
    return image


def direct_ok(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def fio(path: Path, rw: str, bs: str, depth: int, runtime: float, size: int,
        direct: bool) -> dict[str, float]:
    """One fio job; returns iops and mib_s of its direction."""
    argv = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", "--ioengine=libaio", f"--direct={int(direct)}",
            f"--size={size}", f"--runtime={runtime}", "--time_based", "--ramp_time=0.5",
            "--norandommap", "--randrepeat=0", "--output-format=json"]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=runtime * 4 + 60)
    if proc.returncode != 0:
        raise FioError(f"fio {rw} {bs} qd{depth} on {path}: {proc.stderr.strip()[-300:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    if job.get("error"):
        raise FioError(f"fio {rw} {bs} qd{depth} on {path}: error {job['error']}")
    return {"iops": float(side["iops"]), "mib_s": float(side["bw_bytes"]) / MIB}


@contextlib.contextmanager
def nbdfuse(work: Path, uri: str) -> Iterator[Path]:
    """nbdfuse on `uri`, writable; yields its file."""
    mnt = work / "nbdfuse-fio"
    mnt.mkdir()
    pidfile = work / "nbdfuse-fio.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt), uri],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        mount_baselines._wait(lambda: pidfile.exists() and pidfile.stat().st_size > 0,
                              "nbdfuse", proc)
        yield mnt / "nbd"
    finally:
        mount_baselines._fusermount(mnt)
        mount_baselines._stop(proc)


def measure(client: Client, run_dir: Path, work: Path, *, size: int, runtime: float,
            smoke: bool = False) -> dict[str, Any]:
    """The table's figures, on a volume made and exported here (and unexported, removed after)."""
    image = make_image(work, size)
    client.call("volume-add", {"name": VOLUME, "path": str(image), "format": "qcow2",
                               "read_only": False})
    rows: list[dict[str, Any]] = []
    try:
        client.call("export", {"name": VOLUME})
        uri = f"nbd+unix:///{VOLUME}?socket={run_dir / 'nbd.sock'}"
        with nbdfuse(work, uri) as fused:
            files = {"block view": run_dir / "blk" / VOLUME / "disk", "nbdfuse": fused}
            direct = {label: direct_ok(path) for label, path in files.items()}
            jobs = [(w, d) for w in WORKLOADS for d in DEPTHS]
            if smoke:  # one read and one write, at the deep queue
                jobs = [(WORKLOADS[0], DEPTHS[-1]), (WORKLOADS[3], DEPTHS[-1])]
            for i, ((label, rw, bs, figure), depth) in enumerate(jobs):
                row: dict[str, Any] = {"workload": label, "depth": depth, "figure": figure}
                order = READERS if i % 2 == 0 else READERS[::-1]
                for reader in order:
                    row[reader] = fio(files[reader], rw, bs, depth, runtime, size,
                                      direct[reader])[figure]
                row["ratio"] = row["block view"] / row["nbdfuse"]
                rows.append(row)
                print(f"  {label:<24} qd{depth:<3} block view {row['block view']:9.0f}  "
                      f"nbdfuse {row['nbdfuse']:9.0f} {figure}  = {row['ratio']:.2f}x",
                      flush=True)
    finally:
        with contextlib.suppress(Exception):
            client.call("unexport", {"name": VOLUME})
        client.call("volume-remove", {"name": VOLUME})
        image.unlink(missing_ok=True)
    return {"size": size, "runtime": runtime, "engine": "libaio",
            "direct": direct, "uri": uri, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="two workloads, 1 s each, 16 MiB")
    ap.add_argument("--out", type=Path, default=None,
                    help="write fio.json and fio.md there (default: print only)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("fio_table: needs root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("fio_table: fio is not installed (make apt)", file=sys.stderr)
        return 2
    size = (16 if args.smoke else args.size_mib) * MIB
    runtime = 1.0 if args.smoke else args.runtime
    with scratch.gateway("sg-fio-bench-") as (daemon, work), Client(daemon.socket) as client:
        results = {"fio": measure(client, daemon.run_dir, work, size=size, runtime=runtime,
                                  smoke=args.smoke)}
    table = bench_report.fio_markdown(results["fio"])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fio.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "fio.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
