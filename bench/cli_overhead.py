"""gatewayctl's own overhead: a CLI call minus the same call through the Python admin client.

    .venv/bin/python -m bench.cli_overhead [--runs 30] [--out DIR]
    (also a section of `make bench`: bench/mount_latency.py --only cli)

Against a real gatewayd with one bind-mounted qcow2 volume, each command runs `runs` times
through the installed gatewayctl (a new process each time, as a script calls it) and as many
times through gateway.admin.client.call in this process (a new connection each time, as
gatewayctl makes one), the two interleaved so that host noise hits both (`mount` is a warm
remount: an untimed umount and a 50 ms pause come before each). Overhead = CLI p50
minus API p50 (p90 likewise). For context the table also times the interpreter alone
(`python -c pass` from the same virtualenv, site and .pth processing included, and with
`-I -S`, without them).

The children run without PYTHONDONTWRITEBYTECODE (a sandbox may set it): an installed host has
its bytecode compiled, and a checkout writes it on the first run, before the timed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bench_report, scratch
from gateway.admin import client
from gateway.testing.daemon import BIN
from gateway.testing.images import MIB, build_rootfs_tree, make_disk, make_fs_image, to_qcow2

# (label, gatewayctl argv after --socket, admin op, op args, untimed API step run before each)
Case = tuple[str, list[str], str, dict[str, Any], Callable[[str], None] | None]
VOLUME = "cli-bench"
SETTLE = 0.05  # seconds between an untimed step and the timed call


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def cases(volume: str) -> list[Case]:
    def umount(sock: str) -> None:
        client.call(sock, "umount", {"name": volume})
    return [
        ("status", ["status"], "status", {}, None),
        ("volume show", ["volume", "show", volume], "volume-show", {"name": volume}, None),
        ("mount (warm, bind)", ["mount", volume], "mount", {"name": volume, "mode": "bind"},
         umount),
    ]


def _time_cli(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def _time_api(sock: str, op: str, args: dict[str, Any]) -> float:
    t = time.perf_counter()
    client.call(sock, op, args)
    return time.perf_counter() - t


def measure(sock: str | Path, volume: str, runs: int) -> dict[str, Any]:
    """CLI and API seconds per command (`volume` must be registered and not mounted) and the
    interpreter's start-up alone."""
    sock = str(sock)
    env = child_env()
    ctl = [str(BIN / "gatewayctl"), "--socket", sock]
    out: dict[str, Any] = {"runs": runs, "commands": {}}
    for label, argv, op, args, before in cases(volume):
        cli: list[float] = []
        api: list[float] = []
        for i in range(runs + 2):  # two warm-up rounds (bytecode, page cache), untimed
            for driver in (("cli", "api") if i % 2 == 0 else ("api", "cli")):
                if before is not None and (i or driver != "cli"):
                    before(sock)
                    time.sleep(SETTLE)  # what the umount left running ends before the clock starts
                if driver == "cli":
                    t = _time_cli([*ctl, *argv], env)
                else:
                    t = _time_api(sock, op, args)
                if i >= 2:
                    (cli if driver == "cli" else api).append(t)
        if before is not None:
            before(sock)
        out["commands"][label] = {"cli": cli, "api": api}
    python = str(Path(sys.executable))
    out["interpreter"] = {
        "python -c pass": [_time_cli([python, "-c", "pass"], env) for _ in range(runs)],
        "python -I -S -c pass": [_time_cli([python, "-I", "-S", "-c", "pass"], env)
                                 for _ in range(runs)],
    }
    return out


def prepare(work: Path) -> Path:
    """A small GPT + ext4 qcow2 image under `work`."""
    tree = build_rootfs_tree(work / "tree")
    fs = make_fs_image(work / "rootfs.ext4", 32 * MIB, tree)
    raw = make_disk(work / "disk.raw", fs, "gpt")
    fs.unlink()
    image = to_qcow2(raw, work / "disk.qcow2")
    raw.unlink()
    return image


def register(sock: str | Path, volume: str, image: Path) -> None:
    client.call(str(sock), "volume-add", {"name": volume, "path": str(image),
                                          "format": "qcow2", "read_only": False})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None,
                    help="write cli_overhead.json and .md there (default: print only)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("cli_overhead: needs root (gatewayd mounts)", file=sys.stderr)
        return 2
    with scratch.gateway("sg-cli-bench-") as (daemon, work):
        register(daemon.socket, VOLUME, prepare(work))
        results = {"cli_overhead": measure(daemon.socket, VOLUME, args.runs)}
    table = bench_report.cli_markdown(results["cli_overhead"])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cli_overhead.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "cli_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
