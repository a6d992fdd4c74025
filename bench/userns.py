"""User-namespace benchmark: what --userns costs a mount, a container start and, in fuse mode,
the file system work done through the id-shifting layer.

    .venv/bin/python -m bench.userns [--rounds 10] [--io-rounds 3] [--stream-mib 256]
    make bench-userns

One run, one host, side by side on one ext4 volume (a busybox rootfs), the arms alternating so
that all see the same warm caches and lingering export:

  mount   `gatewayctl mount V --mode M` against the same with `--userns`, for bind mode (an
          idmapped clone of the kernel mount) and fuse mode (fuse2fs at the private mount, the
          id-shifting layer at the rootfs), each followed by `umount`; wall time of the mount.
  start   `gatewayctl domain start D --volume V --mode M` against the same with `--userns`, in
          both modes, until the container's init has written /run/booted (seen through
          fuse2fs's or the kernel's mount on the host); then `domain stop`. The userns arms also
          have their own network namespace (<privnet/>), which libvirt needs for them.
  io      fuse mode against fuse mode with --userns, on the host's RUN_DIR/rootfs/V (the path
          the container's root is): metadata-heavy work (`tar x` of 1,000 small files in 50
          directories, `find -printf` of their owners and sizes, `rm -rf`) and streaming work
          (`dd` of --stream-mib MiB written with a final fsync, then read back cold: the volume
          is unmounted and mounted again in between). Plain fuse mode works as root; the userns
          arm as the slice's first uid (container root), since host root owns nothing there.

Writes OUT/userns-latest.json and OUT/userns-latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.snapshot import gateway_with_libvirt
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, build_rootfs_tree, make_fs_image

REPO = Path(__file__).resolve().parent.parent
VOLUME = "unsbench"
DOMAIN = f"sgbench-uns-{os.getpid()}"
RANGE = "2100000000:131072"
MODES = ("bind", "fuse")
ARMS = tuple(f"{mode}{suffix}" for mode in MODES for suffix in ("", "-userns"))
IO_ARMS = ("fuse", "fuse-userns")
IO_STEPS = ("tar x", "find", "rm -rf", "write", "read")
TREE_DIRS, TREE_FILES = 50, 20  # the metadata tarball: 1,000 files of 1-4 KiB


def arm_args(arm: str) -> list[str]:
    mode, _, userns = arm.partition("-")
    return ["--mode", mode, *(["--userns"] if userns else [])]


def ctl(daemon: Daemon, *args: str) -> float:
    """Seconds gatewayctl took (it must succeed)."""
    t = time.perf_counter()
    daemon.ctl(*args, check=True)
    return time.perf_counter() - t


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.002)


def wait_unmounted(daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(daemon.ctl("volume", "show", VOLUME, "--json", check=True).stdout)[
            "attachment"] is not None:
        if time.monotonic() > deadline:
            raise RuntimeError("the volume stayed mounted after domain stop")
        time.sleep(0.02)


def small_files_tarball(path: Path) -> Path:
    """A tarball of TREE_DIRS directories of TREE_FILES small files each (readable by all)."""
    src = path.with_suffix(".d")
    for d in range(TREE_DIRS):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(TREE_FILES):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(1024 * (1 + (d + f) % 4)))
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="tree")
    shutil.rmtree(src)
    path.chmod(0o644)
    return path


def timed(argv: list[str], cwd: Path | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=600)
    return time.perf_counter() - t


def io_round(daemon: Daemon, arm: str, tarball: Path, stream_mib: int) -> dict[str, float]:
    """One pass of the io workloads on a fresh mount of the volume in `arm`'s way."""
    shown = json.loads(daemon.ctl("mount", VOLUME, *arm_args(arm), "--json",
                                  check=True).stdout)
    root = daemon.run_dir / "rootfs" / VOLUME
    who: list[str] = []
    if "idmap" in shown:  # act as the container's root: the slice's first uid and gid
        first_uid, first_gid = shown["idmap"]["uid_first"], shown["idmap"]["gid_first"]
        who = ["setpriv", f"--reuid={first_uid}", f"--regid={first_gid}", "--clear-groups"]
    work = root / "bench"
    out: dict[str, float] = {}
    try:
        subprocess.run([*who, "mkdir", str(work)], check=True, timeout=60)
        out["tar x"] = timed([*who, "tar", "xf", str(tarball), "-C", str(work)])
        out["find"] = timed([*who, "find", str(work), "-printf", "%u %g %s\\n"])
        out["rm -rf"] = timed([*who, "rm", "-rf", str(work / "tree")])
        big = work / "big"
        out["write"] = timed([*who, "dd", "if=/dev/zero", f"of={big}", "bs=1M",
                              f"count={stream_mib}", "conv=fsync"])
        daemon.ctl("umount", VOLUME, check=True)  # the read starts cold
        daemon.ctl("mount", VOLUME, *arm_args(arm), check=True)
        out["read"] = timed([*who, "dd", f"if={big}", "of=/dev/null", "bs=1M"])
        subprocess.run([*who, "rm", "-rf", str(work)], check=True, timeout=60)
    finally:
        daemon.ctl("umount", VOLUME, check=True)
    return out


def remove_booted(path: Path, timeout: float = 5.0) -> None:
    """Unlink the boot mark as root, below any id shift, so the next boot writes it anew.
    Through fuse2fs's mount under the layer this may race with the layer's release of the
    container's file (libfuse 2 answers EBUSY while it still counts it open): retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.unlink()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def run(rounds: int, io_rounds: int, stream_mib: int, work: Path) -> dict[str, Any]:
    tree = build_rootfs_tree(work / "tree")
    image = make_fs_image(work / "rootfs.ext4", (256 + 2 * stream_mib) * MIB, tree)
    tarball = small_files_tarball(work / "small.tar")
    samples: dict[str, dict[str, list[float]]] = {
        "mount": {arm: [] for arm in ARMS}, "start": {arm: [] for arm in ARMS}}
    io: dict[str, dict[str, list[float]]] = {step: {arm: [] for arm in IO_ARMS}
                                             for step in IO_STEPS}
    with gateway_with_libvirt(work, ["--userns-range", RANGE]) as daemon:
        daemon.ctl("volume", "add", VOLUME, str(image), "--format", "raw", check=True)
        for _ in range(rounds):
            for arm in ARMS:
                samples["mount"][arm].append(ctl(daemon, "mount", VOLUME, *arm_args(arm)))
                ctl(daemon, "umount", VOLUME)
        for _ in range(io_rounds):
            for arm in IO_ARMS:
                for step, seconds in io_round(daemon, arm, tarball, stream_mib).items():
                    io[step][arm].append(seconds)
        for _ in range(rounds):
            for arm in ARMS:
                # the host sees the container's /run/booted through the mount below the rootfs
                # (the kernel mount, or fuse2fs's private one) or, in plain fuse mode, fuse2fs's
                below = "rootfs" if arm == "fuse" else "mnt"
                booted = daemon.run_dir / below / VOLUME / "run" / "booted"
                t = time.perf_counter()
                daemon.ctl("domain", "start", DOMAIN, "--volume", VOLUME, *arm_args(arm),
                           check=True)
                wait_for(booted)
                samples["start"][arm].append(time.perf_counter() - t)
                remove_booted(booted)
                ctl(daemon, "domain", "stop", DOMAIN)
                wait_unmounted(daemon)
        ctl(daemon, "volume", "rm", VOLUME)
    return {"rounds": rounds, "io_rounds": io_rounds, "stream_mib": stream_mib,
            "samples": samples, "io": io}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered) * 1000,
            "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000,
            "min_ms": ordered[0] * 1000}


def markdown(results: dict[str, Any]) -> str:
    host = results["host"]
    lines = [f"userns benchmark, {host['date']}, kernel {host['kernel']}, {host['cpus']} CPUs, "
             f"{results['rounds']} rounds per arm ({results['io_rounds']} for io), alternating",
             "", "| what | mode | plain median ms | --userns median ms | x | plain p90 ms | "
             "--userns p90 ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for what, label in (("mount", "`gatewayctl mount`"),
                        ("start", "container start (`domain start` until init ran)")):
        for mode in MODES:
            plain = results["summary"][what][mode]
            userns = results["summary"][what][f"{mode}-userns"]
            lines.append(f"| {label} | {mode} | {plain['median_ms']:.1f} | "
                         f"{userns['median_ms']:.1f} | "
                         f"{userns['median_ms'] / plain['median_ms']:.2f}x | "
                         f"{plain['p90_ms']:.1f} | {userns['p90_ms']:.1f} |")
    mib = results["stream_mib"]
    files = TREE_DIRS * TREE_FILES
    lines += ["", f"fuse mode, work on RUN_DIR/rootfs/VOL ({files} files of 1-4 KiB; "
              f"{mib} MiB streamed):", "",
              "| work | fuse median ms | fuse --userns median ms | x | fuse rate | "
              "fuse --userns rate |", "|---|---:|---:|---:|---:|---:|"]
    for step in IO_STEPS:
        plain = results["io_summary"][step]["fuse"]["median_ms"]
        userns = results["io_summary"][step]["fuse-userns"]["median_ms"]
        if step in ("write", "read"):
            rates = [f"{mib / (v / 1000):.0f} MiB/s" for v in (plain, userns)]
        else:
            rates = [f"{files / (v / 1000):.0f} files/s" for v in (plain, userns)]
        lines.append(f"| `{step}` | {plain:.0f} | {userns:.0f} | {userns / plain:.2f}x | "
                     f"{rates[0]} | {rates[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="samples per arm")
    ap.add_argument("--io-rounds", type=int, default=3, help="fuse-mode io passes per arm")
    ap.add_argument("--stream-mib", type=int, default=256, help="MiB the dd arms write and read")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("userns: needs root (libvirtd, mounts)", file=sys.stderr)
        return 2
    # a userns container resolves its rootfs path as an unprivileged host uid: every directory
    # above the run dir must be searchable by others (mkdtemp makes 0700)
    work = Path(tempfile.mkdtemp(prefix="sg-bench-uns-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        results = run(args.rounds, args.io_rounds, args.stream_mib, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["host"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(), "cpus": os.cpu_count()}
    results["summary"] = {what: {arm: summary(values) for arm, values in arms.items()}
                          for what, arms in results["samples"].items()}
    results["io_summary"] = {step: {arm: summary(values) for arm, values in arms.items()}
                             for step, arms in results["io"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "userns-latest.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "userns-latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
