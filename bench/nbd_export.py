"""Export engine figures: attach latency, sequential read throughput, cache/aio settings.

    .venv/bin/python -m bench.nbd_export [--size-mib 256] [--rounds 20]

Attach latency: warm QSD (export + client connect + first 4 KiB read) versus starting one
qemu-nbd per volume (start + connect + read). Throughput: whole-image sequential read through
NBDClient from QSD under each IOPolicy and from qemu-nbd. Page cache is warm for all but the
O_DIRECT policy (which bypasses it by design).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from gateway.nbd.client import NBDClient
from gateway.nbd.nodes import ExportSpec, IOPolicy
from gateway.nbd.qsd import StorageDaemon

MIB = 1 << 20


async def read_through(sock: str, name: str) -> tuple[float, int]:
    async with NBDClient.open(sock, name) as c:
        t = time.perf_counter()
        step = 16 * MIB
        async with trio.open_nursery() as n:
            sem = trio.Semaphore(4)

            async def part(off: int) -> None:
                async with sem:
                    await c.read_at(off, min(step, c.size - off))

            for off in range(0, c.size, step):
                n.start_soon(part, off)
        return time.perf_counter() - t, c.size


async def qemu_nbd(image: Path, fmt: str, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "-r", "-x", "v", "--socket", str(sock),
                             "--shared=8", "--persistent", str(image)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            s = await trio.open_unix_socket(str(sock))
            await s.aclose()
            return proc
        except OSError:
            await trio.sleep(0.001)


async def attach_bench(work: Path, image: Path, rounds: int) -> None:
    sd = StorageDaemon(work / "run", lambda: [])
    warm: list[float] = []
    cold: list[float] = []
    async with trio.open_nursery() as n:
        await n.start(sd.run)
        for i in range(rounds):
            t = time.perf_counter()
            await sd.export(ExportSpec(f"v{i}", str(image), "raw", read_only=True))
            async with NBDClient.open(str(sd.nbd_path), f"v{i}") as c:
                await c.read_at(0, 4096)
            warm.append(time.perf_counter() - t)
        for i in range(rounds):
            await sd.unexport(f"v{i}")
        n.cancel_scope.cancel()
    for i in range(rounds):
        sock = work / f"qn{i}.sock"
        t = time.perf_counter()
        proc = await qemu_nbd(image, "raw", sock)
        async with NBDClient.open(str(sock), "v") as c:
            await c.read_at(0, 4096)
        cold.append(time.perf_counter() - t)
        proc.terminate()
        proc.wait()
    print(f"attach latency (export+connect+4KiB read), median of {rounds}:")
    print(f"  warm QSD export   {statistics.median(warm) * 1000:7.2f} ms")
    print(f"  qemu-nbd per vol  {statistics.median(cold) * 1000:7.2f} ms")


async def throughput_bench(work: Path, raw: Path, qcow: Path) -> None:
    print("sequential read through NBDClient (MiB/s, best of 3):")
    policies = [IOPolicy("threads", False), IOPolicy("io_uring", False),
                IOPolicy("threads", True), IOPolicy("native", True), IOPolicy("io_uring", True)]
    for fmt, image in (("raw", raw), ("qcow2", qcow)):
        for pol in policies:
            sd = StorageDaemon(work / "tp", lambda: [], io=pol)
            label = f"QSD {fmt:5} aio={pol.aio:8} direct={'on ' if pol.direct else 'off'}"
            try:
                async with trio.open_nursery() as n:
                    await n.start(sd.run)
                    await sd.export(ExportSpec("t", str(image), fmt, read_only=True))  # type: ignore[arg-type]
                    best = min([(await read_through(str(sd.nbd_path), "t")) for _ in range(3)])
                    n.cancel_scope.cancel()
                print(f"  {label}  {best[1] / MIB / best[0]:8.0f}")
            except Exception as exc:
                print(f"  {label}  unavailable: {exc}")
        sock = work / f"tp-{fmt}.sock"
        proc = await qemu_nbd(image, fmt, sock)
        try:
            best = min([(await read_through(str(sock), "v")) for _ in range(3)])
            print(f"  qemu-nbd {fmt:5} (defaults: cache=writeback, aio=threads)"
                  f"      {best[1] / MIB / best[0]:8.0f}")
        finally:
            proc.terminate()
            proc.wait()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbdbench-") as d:
        work = Path(d)
        raw = work / "img.raw"
        with open(raw, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        qcow = work / "img.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow],
                       check=True)
        await attach_bench(work, raw, args.rounds)
        await throughput_bench(work, raw, qcow)


if __name__ == "__main__":
    trio.run(main)
