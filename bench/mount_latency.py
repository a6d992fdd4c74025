"""Mount latency: the gateway's rootfs mounts against the chains one would build by hand.

    .venv/bin/python -m bench.mount_latency [--iterations 20] [--out bench/results] [--smoke]
    make bench

Sections, all in one run and one process tree (the host is shared and noisy, so every ratio
compares figures taken minutes apart at most):

  latency      cold (first mount after registration, page cache dropped) and warm (remount)
               for the gateway paths (bind qcow2, bind raw, fuse qcow2), each through the
               in-process admin client and through the gatewayctl CLI, and for the baselines in
               bench/mount_baselines.py (floor, qemu-nbd+nbdfuse+loop, QSD FUSE export+loop,
               nbdfuse+fuse2fs). Time = start until /etc/marker can be read; teardown untimed.
  concurrency  1, 4, 16, 32 volumes mounted at once through the gateway (wall time until all are)
  size         64 MiB .. 8 GiB sparse ext4 (lazy_itable_init) images, bind qcow2 through the API
  container    `domain-start` until init runs, gateway rootfs vs a plain directory (libvirt-lxc)
  throughput   sequential and 4 KiB random reads of RUN_DIR/blk/VOL/disk vs nbdfuse on the same
               QSD export
  fio          fio at iodepth 1 and 32 on the same two files (bench/fio_table.py)
  cli          gatewayctl's own overhead per command (bench/cli_overhead.py)

Writes OUT/latest.json, OUT/latest.png and OUT/latest.md and prints met/missed per target.
--smoke: one iteration of a few paths, no plot, no container or size sweep (CI: tests/
test_bench_smoke.py). Everything it mounts, attaches or starts is torn down, even on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import mmap
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import bench_report, cli_overhead, fio_table, mount_baselines
from gateway.admin.client import Client
from gateway.attach.attachment import prepare_rootfs_root
from gateway.errors import GatewayError
from gateway.host import loopdev, mounts
from gateway.testing.daemon import BIN, Daemon
from gateway.testing.images import MIB, build_rootfs_tree, make_disk, make_fs_image, to_qcow2

REPO = Path(__file__).resolve().parent.parent
GiB = 1024 * MIB
PART_OFFSET = MIB  # make_disk(..., start_mib=1)
FS_SIZE = 64 * MIB
GATEWAY_PATHS = (("bind", "qcow2"), ("bind", "raw"), ("fuse", "qcow2"))
BASELINES = ("floor", "floor-syscalls", "qemu-nbd+nbdfuse+loop", "qsd-fuse+loop",
             "nbdfuse+fuse2fs")
CONCURRENCY = (1, 4, 16, 32)
SIZES = (64 * MIB, 512 * MIB, 2 * GiB, 8 * GiB)


# ---- helpers ----------------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def read_marker(rootfs: str | Path) -> None:
    with open(Path(rootfs) / "etc" / "marker", "rb") as f:
        if not f.read():
            raise RuntimeError(f"{rootfs}: empty marker")


def sh(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True,
                          text=True).stdout.strip()


def host_facts() -> dict[str, Any]:
    def first_line(*argv: str) -> str:
        try:
            return sh(*argv).splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "unknown"
    rev = first_line("git", "-C", str(REPO), "rev-parse", "HEAD")
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip() != ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), "unknown"),
        "qemu": first_line("qemu-storage-daemon", "--version"),
        "python": platform.python_version(),
        "git_rev": rev + ("-dirty" if dirty else ""),
    }


class Bench:
    def __init__(self, work: Path, iterations: int, smoke: bool) -> None:
        self.work = work
        self.n = iterations
        self.smoke = smoke
        self.daemon: Daemon | None = None
        self.client: Client | None = None
        self.results: dict[str, Any] = {}
        self.umount_failures: list[str] = []

    # ---- images ----------------------------------------------------------------------------

    def build_images(self) -> None:
        img = self.work / "img"
        img.mkdir()
        self.tree = build_rootfs_tree(img / "tree")
        fs = make_fs_image(img / "rootfs.ext4", FS_SIZE, self.tree)
        self.raw = make_disk(img / "disk.raw", fs, "gpt")
        self.qcow2 = to_qcow2(self.raw, img / "disk.qcow2")
        fs.unlink()

    def copy(self, src: Path, name: str) -> Path:
        dst = self.work / "vols" / name
        dst.parent.mkdir(exist_ok=True)
        sh("cp", "--sparse=always", src, dst)
        return dst

    # ---- daemon ----------------------------------------------------------------------------

    def start_daemon(self, tag: str, libvirt_uri: str = "") -> Daemon:
        base = self.work / tag
        base.mkdir()
        daemon = Daemon(state_dir=base / "state", run_dir=base / "run",
                        log_path=base / "gatewayd.log",
                        extra_args=["--libvirt-uri", libvirt_uri, "--log-level", "info"])
        return daemon

    def api(self) -> Client:
        assert self.client is not None
        return self.client

    def add(self, name: str, path: Path, fmt: str) -> None:
        self.api().call("volume-add", {"name": name, "path": str(path), "format": fmt,
                                       "read_only": False})

    def ctl(self, *args: str) -> None:
        assert self.daemon is not None
        proc = subprocess.run([str(BIN / "gatewayctl"), "--socket", str(self.daemon.socket),
                               *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"gatewayctl {' '.join(args)}: {proc.stderr.strip()}")

    # ---- latency -----------------------------------------------------------------------------

    def gateway_mount(self, name: str, mode: str, driver: str) -> float:
        assert self.daemon is not None
        rootfs = self.daemon.run_dir / "rootfs" / name
        t = time.perf_counter()
        if driver == "api":
            self.api().call("mount", {"name": name, "mode": mode})
        else:
            self.ctl("mount", name, "--mode", mode)
        read_marker(rootfs)
        return time.perf_counter() - t

    def latency(self) -> None:
        out: dict[str, Any] = {}
        paths = GATEWAY_PATHS if not self.smoke else GATEWAY_PATHS[:1]
        for mode, fmt in paths:
            src = self.qcow2 if fmt == "qcow2" else self.raw
            for driver in ("api", "cli"):
                name = f"{mode}-{fmt}-{driver}"
                key = f"gateway {mode} {fmt} ({driver})"
                path = self.copy(src, name + "." + fmt)
                cold: list[float] = []
                warm: list[float] = []
                for _ in range(self.n):
                    self.add(name, path, fmt)
                    drop_caches()
                    cold.append(self.gateway_mount(name, mode, driver))
                    self.api().call("umount", {"name": name})
                    warm.append(self.gateway_mount(name, mode, driver))
                    self.api().call("umount", {"name": name})
                    self.api().call("volume-remove", {"name": name})
                out[key] = {"cold": cold, "warm": warm}
                print(f"  {key:<34} cold p50 {bench_report.ms(cold)}  warm p50 "
                      f"{bench_report.ms(warm)}", flush=True)
        img = mount_baselines.Images(self.raw, self.qcow2, PART_OFFSET, FS_SIZE)
        names = BASELINES if not self.smoke else ("floor", "qemu-nbd+nbdfuse+loop")
        for chain in names:
            work = self.work / "chains" / chain.replace("+", "-")
            work.mkdir(parents=True)
            cold, warm = [], []
            failures: list[str] = []
            for _ in range(self.n):
                for bucket, drop in ((cold, True), (warm, False)):
                    if drop:
                        drop_caches()
                    t = time.perf_counter()
                    try:
                        m = mount_baselines.mount_chain(chain, img, work)
                    except mount_baselines.ChainError as exc:
                        failures.append(str(exc))  # counted, not timed; the chain goes on
                        continue
                    bucket.append(time.perf_counter() - t)
                    m.close()
            out[chain] = {"cold": cold, "warm": warm, "failures": failures}
            print(f"  {chain:<34} cold p50 {bench_report.ms(cold)}  warm p50 "
                  f"{bench_report.ms(warm)}", flush=True)
        self.results["latency"] = {"iterations": self.n, "paths": out,
                                   "gateway_phases_p50": self.phases()}

    def phases(self) -> dict[str, dict[str, float]]:
        """Median per-phase seconds of each gateway path, from gatewayd's "rootfs mounted" logs."""
        assert self.daemon is not None
        seen: dict[str, dict[str, list[float]]] = {}
        for line in self.daemon.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("msg", rec.get("message")) == "rootfs mounted":
                    for k, v in rec.get("phases", {}).items():
                        seen.setdefault(rec["volume"], {}).setdefault(k, []).append(v)
        return {vol: {k: bench_report.median(v) for k, v in ph.items()}
                for vol, ph in seen.items()}

    # ---- concurrency -----------------------------------------------------------------------

    def concurrency(self) -> None:
        assert self.daemon is not None
        levels = CONCURRENCY if not self.smoke else (1, 4)
        reps = 1 if self.smoke else 5
        top = max(levels)
        names = [f"c{i:02d}" for i in range(top)]
        for name in names:
            self.add(name, self.copy(self.qcow2, name + ".qcow2"), "qcow2")
        clients = [Client(self.daemon.socket) for _ in names]
        out: dict[str, Any] = {}
        failures: list[str] = []
        try:
            for level in levels:
                walls: list[float] = []
                for _ in range(reps):
                    try:
                        walls.append(self._mount_many(clients[:level], names[:level]))
                    except RuntimeError as exc:
                        failures.append(f"{level} at once: {exc}")
                        print(f"  {level:>2} at once FAILED: {exc}", flush=True)
                out[str(level)] = walls
                print(f"  {level:>2} at once: wall p50 {bench_report.ms(walls)}", flush=True)
        finally:
            for c in clients:
                c.close()
            for name in names:
                with contextlib.suppress(Exception):
                    self.api().call("umount", {"name": name, "force": True})
                try:
                    self.api().call("volume-remove", {"name": name})
                except GatewayError as exc:  # recorded; the leak check at the end reports it
                    failures.append(f"cleanup of {name}: {exc.message}")
        floor = self._floor_many(levels, reps)
        self.results["concurrency"] = {"reps": reps, "mode": "bind", "format": "qcow2",
                                       "wall": out, "failures": failures,
                                       "concurrent_umount_failures": self.umount_failures,
                                       "floor_syscalls_wall": floor}

    def _floor_many(self, levels: tuple[int, ...], reps: int) -> dict[str, list[float]]:
        """Context for the sweep: the kernel's own cost of N mounts at once (floor-syscalls:
        LOOP_CONFIGURE + mount(2) of raw copies, one thread each), same levels, caches dropped."""
        top = max(levels)
        imgs = [mount_baselines.Images(self.copy(self.raw, f"floor{i}.raw"), self.qcow2,
                                       PART_OFFSET, FS_SIZE) for i in range(top)]
        out: dict[str, list[float]] = {}
        for level in levels:
            walls = [self._floor_wave(imgs[:level]) for _ in range(reps)]
            out[str(level)] = walls
            print(f"  floor-syscalls {level:>2} at once: wall p50 {bench_report.ms(walls)}",
                  flush=True)
        return out

    def _mount_many(self, clients: list[Client], names: list[str]) -> float:
        assert self.daemon is not None
        run_dir = self.daemon.run_dir

        def one(c: Client, name: str, action: str) -> None:
            c.call(action, {"name": name, "mode": "bind"} if action == "mount" else {"name": name})
            if action == "mount":
                read_marker(run_dir / "rootfs" / name)

        def wave(action: str) -> tuple[float, list[BaseException]]:
            return at_once([functools.partial(one, c, n, action)
                            for c, n in zip(clients, names, strict=True)])

        drop_caches()
        wall, errors = wave("mount")
        _, down = wave("umount")  # also after a failed wave: the next one starts from nothing
        if down:  # the mounts stood (wall is valid); a failed teardown is retried and reported
            self.umount_failures.append(repr(down[0]))
            for name in names:
                with contextlib.suppress(Exception):
                    self.api().call("umount", {"name": name})
        if errors:
            raise RuntimeError(f"concurrent mount failed: {errors[0]!r}")
        return wall

    def _floor_wave(self, imgs: list[mount_baselines.Images]) -> float:
        done: list[mount_baselines.Mounted | None] = [None] * len(imgs)
        works = [self.work / "floor-conc" / str(i) for i in range(len(imgs))]
        for work in works:
            work.mkdir(parents=True, exist_ok=True)

        def one(i: int) -> None:
            done[i] = mount_baselines.mount_chain("floor-syscalls", imgs[i], works[i])

        drop_caches()
        wall, errors = at_once([functools.partial(one, i) for i in range(len(imgs))])
        for m in done:
            if m is not None:
                m.close()
        if errors:
            raise RuntimeError(f"floor-syscalls, {len(imgs)} at once: {errors[0]!r}")
        return wall

    # ---- size sweep ------------------------------------------------------------------------

    def sized_disk(self, size: int) -> Path:
        d = self.work / "sized"
        d.mkdir(exist_ok=True)
        raw = d / f"disk-{size // MIB}M.raw"
        with open(raw, "wb") as f:
            f.truncate(size + 2 * MIB)
        script = (f"label: gpt\nstart={PART_OFFSET // 512}, size={size // 512}, "
                  "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
        subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(raw)],
                       input=script.encode(), check=True, capture_output=True)
        sh("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", self.tree, "-E",
           f"offset={PART_OFFSET},lazy_itable_init=1,lazy_journal_init=1", raw,
           f"{size // 1024}k")
        qcow2 = to_qcow2(raw, d / f"disk-{size // MIB}M.qcow2")
        raw.unlink()
        return qcow2

    def size_sweep(self) -> None:
        reps = 5
        out: dict[str, Any] = {}
        for size in SIZES:
            path = self.sized_disk(size)
            name = f"s{size // MIB}"
            cold, warm = [], []
            for _ in range(reps):
                self.add(name, path, "qcow2")
                drop_caches()
                cold.append(self.gateway_mount(name, "bind", "api"))
                self.api().call("umount", {"name": name})
                warm.append(self.gateway_mount(name, "bind", "api"))
                self.api().call("umount", {"name": name})
                self.api().call("volume-remove", {"name": name})
            path.unlink()
            out[str(size)] = {"cold": cold, "warm": warm}
            print(f"  {size // MIB:>5} MiB: cold p50 {bench_report.ms(cold)}  warm p50 "
                  f"{bench_report.ms(warm)}", flush=True)
        self.results["size"] = {"reps": reps, "mode": "bind", "format": "qcow2", "sizes": out}

    # ---- block-view throughput ---------------------------------------------------------------

    def throughput(self, stack: contextlib.ExitStack) -> None:
        assert self.daemon is not None
        size = (64 if self.smoke else 256) * MIB
        raw = self.work / "tput.raw"
        with open(raw, "wb") as f:
            for _ in range(size // MIB):
                f.write(random.randbytes(MIB))
        qcow2 = to_qcow2(raw, self.work / "tput.qcow2")
        raw.unlink()
        self.add("tput", qcow2, "qcow2")
        self.api().call("export", {"name": "tput"})
        stack.callback(lambda: self.api().call("unexport", {"name": "tput"}))
        run_dir = self.daemon.run_dir
        fmnt = self.work / "nbdfuse-tput"
        fmnt.mkdir()
        pidfile = self.work / "nbdfuse-tput.pid"
        uri = f"nbd+unix:///tput?socket={run_dir / 'nbd.sock'}"
        proc = subprocess.Popen(["nbdfuse", "-r", "-P", str(pidfile), str(fmnt), uri],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        stack.callback(mount_baselines._stop, proc)
        stack.callback(mount_baselines._fusermount, fmnt)
        mount_baselines._wait(lambda: pidfile.exists() and pidfile.stat().st_size > 0,
                              "nbdfuse", proc)
        files = {"block view": run_dir / "blk" / "tput" / "disk", "nbdfuse": fmnt / "nbd"}
        reps = 1 if self.smoke else 5  # the VM is noisy: medians of 5
        rand_count = 500 if self.smoke else 4000
        out: dict[str, Any] = {k: {"seq_mib_s": [], "rand4k_iops": [], "io": ""} for k in files}
        for rep in range(reps):
            order = list(files.items()) if rep % 2 == 0 else list(reversed(files.items()))
            for label, path in order:
                io, seq = read_seq(path, size)
                out[label]["io"] = io
                out[label]["seq_mib_s"].append(seq)
                _, iops = read_random(path, size, rand_count, seed=rep)
                out[label]["rand4k_iops"].append(iops)
        for label, d in out.items():
            print(f"  {label:<12} seq {bench_report.median(d['seq_mib_s']):8.1f} MiB/s  "
                  f"rand4k {bench_report.median(d['rand4k_iops']):8.0f} IOPS  ({d['io']})",
                  flush=True)
        self.results["throughput"] = {"size": size, "reps": reps, "rand_reads": rand_count,
                                      "uri": uri, "files": out}

    # ---- gatewayctl overhead and fio (bench/cli_overhead.py, bench/fio_table.py) -------------

    def cli(self) -> None:
        assert self.daemon is not None
        name = "cli-bench"
        self.add(name, self.copy(self.qcow2, name + ".qcow2"), "qcow2")
        try:
            self.results["cli_overhead"] = cli_overhead.measure(
                self.daemon.socket, name, 3 if self.smoke else 30)
        finally:
            self.api().call("volume-remove", {"name": name})
        print(bench_report.cli_markdown(self.results["cli_overhead"]), flush=True)

    def fio(self) -> None:
        assert self.daemon is not None
        if shutil.which("fio") is None:
            self.results["fio_skipped"] = "fio is not installed (make apt)"
            return
        work = self.work / "fio"
        work.mkdir()
        self.results["fio"] = fio_table.measure(
            self.api(), self.daemon.run_dir, work, size=(16 if self.smoke else 256) * MIB,
            runtime=1.0 if self.smoke else 5.0, smoke=self.smoke)

    # ---- container start ---------------------------------------------------------------------

    def container(self, stack: contextlib.ExitStack) -> None:
        try:
            self._container(stack)
        except Exception as exc:  # recorded, the rest of the bench stands
            self.results["container"] = {"skipped": f"{type(exc).__name__}: {exc}"}
            print(f"  container start skipped: {exc}", flush=True)

    def _container(self, stack: contextlib.ExitStack) -> None:
        from gateway.libvirt import libvirtd
        from gateway.libvirt.connection import DEFAULT_URI, is_reachable
        from gateway.libvirt.domain import domain_xml

        # A libvirtd shared with other sessions may hang in a hook: ask in a thread, bounded.
        answer: list[bool] = []
        probe = threading.Thread(target=lambda: answer.append(is_reachable(DEFAULT_URI)),
                                 daemon=True)
        probe.start()
        probe.join(15.0)
        if not answer:
            raise RuntimeError(f"libvirtd at {DEFAULT_URI} does not answer within 15 s "
                               "(a running libvirtd shared with other sessions is stuck)")
        daemon = self.start_daemon("ct", libvirt_uri="lxc:///")
        prepare_rootfs_root(daemon.run_dir)
        stack.callback(self._cleanup_daemon, daemon)
        # A private hooks dir holding the gateway hook for this daemon, as a deployment would
        # have it (a hook left in /etc/libvirt/hooks by `make run` names another socket).
        from gateway.libvirt.hook import install_hook
        hooks = self.work / "hooks"
        hooks.mkdir(exist_ok=True)
        install_hook(hooks, str(daemon.socket))
        handle = libvirtd.ensure_libvirtd([daemon.run_dir / "rootfs"], hooks_dir=hooks)
        stack.callback(handle.stop)
        if not handle.owned and not reaches_libvirtd(daemon.run_dir / "rootfs"):
            raise RuntimeError("a libvirtd was already running and mounts under this run dir "
                               "do not reach it")
        daemon.start()
        plain = self.work / "plain-root"
        sh("cp", "-a", self.tree, plain)
        vol = self.copy(self.qcow2, "ct.qcow2")
        reps = self.n
        out: dict[str, list[float]] = {"gateway (domain-start incl. mount)": [],
                                       "gateway (premounted)": [], "plain dir": []}
        tag = f"sgb{os.getpid()}"
        with Client(daemon.socket) as c:
            c.call("volume-add", {"name": "ct", "path": str(vol), "format": "qcow2",
                                  "read_only": False})
            rootfs = daemon.run_dir / "rootfs" / "ct"
            for i in range(reps):
                # init writes a fresh token file; the host sees it through the shared mount
                for label in out:
                    token = f"booted-{i}-{len(label)}"
                    args = ["-c", f"echo up > /run/{token}; exec sleep 100000"]
                    name = f"{tag}-{i}-{len(label)}"
                    if label == "plain dir":
                        xml = domain_xml(name, str(plain), "plain", "bind", init="/bin/sh",
                                         args=args)
                        t = time.perf_counter()
                        start_plain_domain(xml)
                        try:
                            wait_file(plain / "run" / token)
                            out[label].append(time.perf_counter() - t)
                        finally:
                            stop_plain_domain(name)
                        continue
                    premount = label == "gateway (premounted)"
                    if premount:
                        c.call("mount", {"name": "ct", "mode": "bind"})
                    t = time.perf_counter()
                    c.call("domain-start", {"name": name, "volume": "ct", "mode": "bind",
                                            "init": "/bin/sh", "args": args})
                    try:
                        wait_file(rootfs / "run" / token)
                        out[label].append(time.perf_counter() - t)
                    finally:
                        c.call("domain-stop", {"name": name})
                        c.call("umount", {"name": "ct"})
        for label, vals in out.items():
            print(f"  {label:<36} p50 {bench_report.ms(vals)}", flush=True)
        self.results["container"] = {"reps": reps, "signal": "init writes /run/TOKEN, polled "
                                     "from the host through the rootfs mount", "start": out,
                                     "libvirtd_owned": handle.owned}

    def _cleanup_daemon(self, daemon: Daemon) -> None:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            self.results.setdefault("daemon_crashes", []).append(
                {"exit": daemon.proc.returncode, "log_tail": daemon.log_tail(40)})
        leaked = daemon.cleanup()
        if leaked:
            self.results.setdefault("leaks", []).extend(leaked)


def start_plain_domain(xml: str) -> None:
    """A transient domain on a plain directory: no gateway metadata, so no hook work."""
    import libvirt
    xml = re.sub(r"<metadata>.*?</metadata>", "", xml, flags=re.S)
    conn = libvirt.open("lxc:///")
    try:
        conn.createXML(xml, 0)
    finally:
        conn.close()


def stop_plain_domain(name: str) -> None:
    import libvirt
    conn = libvirt.open("lxc:///")
    try:
        conn.lookupByName(name).destroy()
    finally:
        conn.close()


def reaches_libvirtd(shared: Path) -> bool:
    try:
        pid = int(Path("/var/run/libvirtd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    probe = shared / "bench-probe"
    probe.mkdir(exist_ok=True)
    mounts.mount("bench-probe", probe, "tmpfs")
    try:
        return f" {probe} " in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    finally:
        mounts.umount(probe)
        probe.rmdir()


def at_once(jobs: list[Callable[[], None]]) -> tuple[float, list[BaseException]]:
    """Run each job in its own thread, all released together: the wall time until the last one
    is done, and what they raised."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # returned to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for th in threads:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - t, errors


def wait_file(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout}s")
        time.sleep(0.002)


def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants


def _open_direct(path: Path) -> tuple[int, str]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), "O_DIRECT"
    except OSError:
        drop_caches()
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), "buffered after drop_caches"


def read_seq(path: Path, size: int, block: int = MIB) -> tuple[str, float]:
    drop_caches()
    fd, io = _open_direct(path)
    buf = _aligned(block)
    try:
        t = time.perf_counter()
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        elapsed = time.perf_counter() - t
    finally:
        os.close(fd)
        buf.close()
    return io, off / MIB / elapsed


def read_random(path: Path, size: int, count: int, seed: int) -> tuple[str, float]:
    drop_caches()
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    fd, io = _open_direct(path)
    buf = _aligned(4096)
    try:
        t = time.perf_counter()
        for off in offsets:
            os.preadv(fd, [buf], off)
        elapsed = time.perf_counter() - t
    finally:
        os.close(fd)
        buf.close()
    return io, count / elapsed


def sweep(work: Path) -> None:
    """Last resort after a crash: stop the processes this run started (their command lines name
    the work dir; each by pid), unmount what is mounted below it, detach its loop devices."""
    mine = str(work).encode()
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mine in (pid_dir / "cmdline").read_bytes():
                    os.kill(int(pid_dir.name), signal.SIGTERM)
    time.sleep(0.5)
    for m in mounts.mounts_under(work):
        with contextlib.suppress(Exception):
            mounts.umount(m.mount_point, lazy=True)
    for dev in loopdev.devices_backed_by(work):
        with contextlib.suppress(Exception):
            loopdev.detach(dev)


def leftovers(work: Path) -> list[str]:
    found = [f"mount {m.mount_point}" for m in mounts.mounts_under(work)]
    found += [f"loop {d}" for d in loopdev.devices_backed_by(work)]
    mine = str(work).encode()
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mine in (pid_dir / "cmdline").read_bytes():
                    found.append(f"process {pid_dir.name}")
    return found


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt so every finally block runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    bench = Bench(work, 1 if args.smoke else args.iterations, args.smoke)
    bench.results["host"] = host_facts()
    bench.results["smoke"] = args.smoke
    sections: list[tuple[str, Callable[[contextlib.ExitStack], None]]] = [
        ("latency", lambda s: bench.latency()),
        ("concurrency", lambda s: bench.concurrency()),
        ("throughput", bench.throughput),
        ("fio", lambda s: bench.fio()),
        ("cli", lambda s: bench.cli()),
    ]
    if not args.smoke:
        sections.insert(2, ("size", lambda s: bench.size_sweep()))
        if not args.no_container:
            sections.append(("container", bench.container))
    wanted = set(args.only.split(",")) if args.only else None
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, work, True)
            print(f"building images in {work}", flush=True)
            bench.build_images()
            daemon = bench.start_daemon("gw")
            stack.callback(bench._cleanup_daemon, daemon)
            daemon.start()
            bench.daemon = daemon
            bench.client = stack.enter_context(Client(daemon.socket))
            for name, section in sections:
                if wanted is not None and name not in wanted:
                    continue
                print(f"[{name}]", flush=True)
                with contextlib.ExitStack() as inner:
                    section(inner)
            bench.client.close()
    finally:
        leaked = leftovers(work)
        if leaked:
            bench.results.setdefault("leaks", []).extend(leaked)
            print(f"LEAKED (now swept): {leaked}", file=sys.stderr)
            sweep(work)
            shutil.rmtree(work, ignore_errors=True)
        for crash in bench.results.get("daemon_crashes", []):
            print(f"gatewayd exited {crash['exit']}:\n{crash['log_tail']}", file=sys.stderr)
    bench.results["elapsed_s"] = round(time.monotonic() - t0, 1)
    return bench.results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--smoke", action="store_true", help="one iteration, few paths, no plot")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-container", action="store_true")
    ap.add_argument("--only", help="comma-separated sections (latency,concurrency,size,"
                                   "throughput,fio,cli,container)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("mount_latency: needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 2
    with signals_raise():
        results = run(args)
    results["targets"] = bench_report.targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    table = bench_report.markdown(results)
    (args.out / "latest.md").write_text(table)
    if not (args.smoke or args.no_plot):
        bench_report.plot(results, args.out / "latest.png")
    print()
    print(table)
    for t in results["targets"]:
        print(f"{t['status']:>7}  {t['name']}: {t['detail']}")
    return 1 if results.get("leaks") else 0


if __name__ == "__main__":
    sys.exit(main())
