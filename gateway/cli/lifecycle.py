"""gatewayctl volume create / import, and job status.

Long operations are daemon jobs (see gateway.admin.lifecycle_ops): the command polls `job-status`
until the job ends. On a terminal a progress bar is drawn on stderr; with --json every progress
change is one JSON line on stdout (`{"job", "state", "progress"}`) and the last line is the
finished job, whose `result` is the new volume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

POLL_SECONDS = 0.2
BAR = 30


def _call(ns: argparse.Namespace, op: str, args: dict[str, Any]) -> Any:
    from gateway.cli.main import call
    return call(ns, op, args)


def _bar(percent: float) -> str:
    filled = int(BAR * percent / 100)
    return f"\r[{'#' * filled}{' ' * (BAR - filled)}] {percent:5.1f}%"


def follow(ns: argparse.Namespace, started: dict[str, Any]) -> dict[str, Any]:
    """Poll a job until it ends; raise its error as a GatewayError."""
    from gateway.errors import GatewayError
    tty = sys.stderr.isatty() and not ns.json
    job = started
    last: float | None = None
    while True:
        if ns.json and job["progress"] != last:
            print(json.dumps({"job": job["job"], "state": job["state"],
                              "progress": job["progress"]}), flush=True)
        elif tty and job["progress"] != last:
            sys.stderr.write(_bar(job["progress"]))
            sys.stderr.flush()
        last = job["progress"]
        if job["state"] != "running":
            break
        time.sleep(POLL_SECONDS)
        job = _call(ns, "job-status", {"id": job["job"]})
    if tty:
        sys.stderr.write("\n")
    if job["state"] == "failed":
        error = job.get("error") or {}
        raise GatewayError(error.get("message", "job failed"),
                           code=error.get("code", "internal"))
    return job


def _done(ns: argparse.Namespace, answer: dict[str, Any]) -> int:
    if "job" not in answer:
        volume = answer["volume"]
    else:
        job = follow(ns, answer)
        volume = job["result"]
        if ns.json:
            print(json.dumps(job))
            return 0
    if ns.json:
        print(json.dumps({"state": "done", "progress": 100.0, "result": volume}))
        return 0
    from gateway.cli.main import size_text
    print(f"created {volume['name']} ({volume['origin']}, {volume['format']}, "
          f"{size_text(volume['virtual_size'])}) at {volume['path']}")
    return 0


def cmd_create(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "from": ns.source, "overlay": ns.overlay, "copy": ns.copy,
            "format": ns.format, "size": ns.size, "mkfs": ns.mkfs, "label": ns.label,
            "partitioned": ns.partitioned, "setuid": ns.setuid, "noexec": ns.noexec}
    return _done(ns, _call(ns, "volume-create", args))


def cmd_import(ns: argparse.Namespace) -> int:
    import os
    args = {"name": ns.name, "tarball": os.path.abspath(ns.tarball), "size": ns.size,
            "format": ns.format, "label": ns.label, "partitioned": ns.partitioned,
            "setuid": ns.setuid, "noexec": ns.noexec}
    return _done(ns, _call(ns, "volume-import", args))


def cmd_resize(ns: argparse.Namespace) -> int:
    result = _call(ns, "volume-resize", {"name": ns.name, "size": ns.size})
    if ns.json:
        print(json.dumps(result))
        return 0
    from gateway.cli.main import size_text
    fs = result["filesystem"]
    print(f"resized {result['name']} to {size_text(result['virtual_size'])}; "
          f"{fs['fs']} {'grown' if fs['grown'] else 'left as it was'}")
    return 0


def cmd_job(ns: argparse.Namespace) -> int:
    job = _call(ns, "job-status", {"id": ns.id})
    if ns.json:
        print(json.dumps(job))
    else:
        error = (job.get("error") or {}).get("message")
        print(f"job {job['job']} {job['kind']} {job['volume']}: {job['state']} "
              f"{job['progress']}%" + (f" ({error})" if error else ""))
    return 0


def register(top: Any, groups: dict[str, Any]) -> None:
    from gateway.cli.main import add_mount_flags
    volume = groups["volume"]
    p = volume.add_parser(
        "create", help="make a volume: --from BASE --overlay|--copy, or blank with --mkfs")
    p.add_argument("name")
    p.add_argument("--from", dest="source", metavar="BASE", help="a registered volume")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--overlay", action="store_true",
                     help="a qcow2 overlay backed by BASE (BASE turns read-only)")
    how.add_argument("--copy", action="store_true", help="a full independent copy of BASE")
    p.add_argument("--format", choices=["raw", "qcow2"],
                   help="image format (copy: default BASE's; blank: required)")
    p.add_argument("--size", help="blank volume size, e.g. 512M, 2G")
    p.add_argument("--mkfs", choices=["ext4", "xfs"], help="filesystem of a blank volume")
    p.add_argument("--label", help="filesystem label")
    p.add_argument("--partitioned", action="store_true",
                   help="put the filesystem in a GPT partition at 1 MiB")
    add_mount_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_create)

    p = volume.add_parser("import", help="build an ext4 rootfs volume from a tarball")
    p.add_argument("name")
    p.add_argument("--tarball", required=True,
                   help="ROOTFS.tar[.gz|.xz|.bz2|.zst]")
    p.add_argument("--size", required=True, help="volume size, e.g. 256M")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    p.add_argument("--label", help="filesystem label")
    p.add_argument("--partitioned", action="store_true",
                   help="put the filesystem in a GPT partition at 1 MiB")
    add_mount_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_import)

    p = volume.add_parser("resize", help="grow a volume and its filesystem (never shrinks)")
    p.add_argument("name")
    p.add_argument("--size", required=True, help="new size, e.g. 1G")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_resize)

    p = top.add_parser("job", help="show a daemon job (volume create/import)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_job)
