"""Shared pieces of the fault-injection tests: a fsyncing writer process, waits, and checks.

The writer is a separate process that writes numbered 4 KiB files into a directory on a mounted
rootfs, fsyncs each file and the directory, and only then records the number (with the monotonic
time of the ack) in an ack file that lives outside the gateway (so the ack survives any fault).
After a fault, every acknowledged file must be present with its exact content; the largest gap
between two acks is the write stall the fault caused.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.attach import attachment
from gateway.testing.daemon import Daemon

CYCLES = int(os.environ.get("SOAK_CYCLES", "1"))
REPORT = os.environ.get("SOAK_REPORT")  # append one JSON line per cycle when set

WRITER = r"""
import os, sys, time
target, ack = sys.argv[1], sys.argv[2]
os.makedirs(target, exist_ok=True)
with open(ack, "a") as log:
    i = 0
    while True:
        path = os.path.join(target, "f%06d" % i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, (("%d:" % i) * 2048).encode()[:4096])
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        log.write("%d %.6f\n" % (i, time.monotonic()))
        log.flush()
        os.fsync(log.fileno())
        i += 1
"""


def content(i: int) -> bytes:
    return (f"{i}:" * 2048).encode()[:4096]


@dataclass
class Writer:
    target: Path
    ack: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(self.target),
                                      str(self.ack)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _rows(self) -> list[list[str]]:
        try:
            text = self.ack.read_text()
        except FileNotFoundError:
            return []
        return [row.split() for row in text.splitlines() if len(row.split()) == 2]

    def acked(self) -> list[int]:
        return [int(row[0]) for row in self._rows()]

    def max_stall(self) -> float:
        """The largest gap, in seconds, between two consecutive acks."""
        times = [float(row[1]) for row in self._rows()]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def wait_acks(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked()) < count:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"writer died: {err!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"writer made {len(self.acked())} acks in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def status(daemon: Daemon) -> dict[str, Any]:
    proc = daemon.ctl("status", "--json", timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def healthy(daemon: Daemon) -> bool:
    return bool(status(daemon).get("healthy"))


def gatewayd_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def leaks(daemon: Daemon, volume: str) -> list[str]:
    """What of `volume` is left, plus stray processes (more than one QSD, any fuse2fs)."""
    found = attachment.leftovers(daemon.run_dir, volume,
                                 keep=daemon.standby_loops().get(volume))
    qsds = [x for x in daemon.leftovers() if ": qemu-storage-daemon " in x]
    if len(qsds) > 1:
        found += qsds
    found += [x for x in daemon.leftovers() if x.startswith("process ") and ": fuse2fs " in x]
    return found


def verify_data(daemon: Daemon, volume: str, target_rel: str, acked: list[int],
                mode: str = "bind") -> int:
    """Mount (bind: the kernel replays the ext4 journal; fuse: the gateway preens with e2fsck
    first), check every acked file, umount. Returns the count."""
    daemon.ctl("mount", volume, "--mode", mode, check=True)
    try:
        root = daemon.run_dir / "rootfs" / volume / target_rel
        missing = [i for i in acked if not (root / f"f{i:06d}").is_file()
                   or (root / f"f{i:06d}").read_bytes() != content(i)]
        assert missing == [], f"acknowledged writes lost or damaged: {missing[:20]}"
    finally:
        daemon.ctl("umount", volume, check=True)
    return len(acked)


def fsck_clean(image: Path) -> str:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"e2fsck -fn {image}: {proc.returncode}\n{proc.stdout}"
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class CycleReport:
    scenario: str
    cycle: int
    acked: int = 0
    recovery_s: float = 0.0
    stall_s: float = 0.0  # the writer's largest gap between two acks in the cycle
    leaks: list[str] = field(default_factory=list)
    gatewayd_fds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def emit(self) -> None:
        line = json.dumps(vars(self))
        print(line)
        if REPORT:
            with open(REPORT, "a") as f:
                f.write(line + "\n")
