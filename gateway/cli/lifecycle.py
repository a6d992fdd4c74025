"""gatewayctl volume create / import / resize / snapshot / save, and jobs (job show / cancel / ls).

Long operations are daemon jobs (see gateway.admin.jobs): the command polls `job-status` until
the job ends. On a terminal a progress bar is drawn on stderr; with --json every progress change
is one JSON line on stdout (`{"job", "state", "progress"}`) and the last line is the finished job,
whose `result` is the new volume. `job cancel ID` stops a job and waits until it has ended.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gateway.cli.base import Parser, absolute, add_mount_flags, call, emit, size_text, table

POLL_SECONDS = 0.2
BAR = 30
JOB_COMMANDS = ("show", "cancel", "ls")


def _bar(percent: float) -> str:
    filled = int(BAR * percent / 100)
    return f"\r[{'#' * filled}{' ' * (BAR - filled)}] {percent:5.1f}%"


def follow(ns: argparse.Namespace, started: dict[str, Any]) -> dict[str, Any]:
    """Poll a job until it ends; raise its error as the GatewayError its code stands for."""
    from gateway.admin.client import error_for
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
        job = call(ns, "job-status", {"id": job["job"]})
    if tty:
        sys.stderr.write("\n")
    if job["state"] == "failed":
        error = job.get("error") or {}
        raise error_for(error.get("code", "internal"), error.get("message", "job failed"))
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
    print(f"created {volume['name']} ({volume['origin']}, {volume['format']}, "
          f"{size_text(volume['virtual_size'])}) at {volume['path']}")
    return 0


def cmd_create(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "from": ns.source, "overlay": ns.overlay, "copy": ns.copy,
            "format": ns.format, "size": ns.size, "mkfs": ns.mkfs, "label": ns.label,
            "partitioned": ns.partitioned, "setuid": ns.setuid, "noexec": ns.noexec,
            "pool": ns.pool, "ceph_conf": absolute(ns.ceph_conf) if ns.ceph_conf else None,
            "ceph_user": ns.ceph_user}
    return _done(ns, call(ns, "volume-create", args))


def cmd_import(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "tarball": absolute(ns.tarball), "size": ns.size,
            "format": ns.format, "label": ns.label, "partitioned": ns.partitioned,
            "setuid": ns.setuid, "noexec": ns.noexec}
    return _done(ns, call(ns, "volume-import", args))


def cmd_resize(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-resize", {"name": ns.name, "size": ns.size})
    if ns.json:
        print(json.dumps(result))
        return 0
    fs = result["filesystem"]
    print(f"resized {result['name']} to {size_text(result['virtual_size'])}; "
          f"{fs['fs']} {'grown' if fs['grown'] else 'left as it was'}")
    return 0


def _instant_text(taken: dict[str, Any]) -> str:
    """How a point-in-time copy was taken, in words."""
    consistency = taken.get("consistency")
    freeze = taken.get("freeze_ms")
    if consistency == "frozen":
        how = f"filesystem frozen for {freeze} ms"
    elif consistency == "crash-consistent":
        how = "crash-consistent (the filesystem could not be frozen)"
    else:
        how = "not mounted"
    return f"at {taken.get('at')}, {how}"


def cmd_snapshot(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "to": ns.to, "format": ns.format, "rate_limit": ns.rate_limit}
    job = follow(ns, call(ns, "volume-snapshot", args))
    if ns.json:
        print(json.dumps(job))
        return 0
    volume = job["result"]
    print(f"created {volume['name']} (snapshot of {ns.name}, {volume['format']}, "
          f"{size_text(volume['virtual_size'])}) at {volume['path']}")
    print(_instant_text(volume["lineage"]))
    return 0


def cmd_save(ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "file": absolute(ns.file), "format": ns.format,
            "compress": ns.compress, "force": ns.force, "rate_limit": ns.rate_limit}
    job = follow(ns, call(ns, "volume-save", args))
    if ns.json:
        print(json.dumps(job))
        return 0
    saved = job["result"]
    kind = f"{saved['format']}{', compressed' if saved['compress'] else ''}"
    print(f"saved {saved['name']} to {saved['file']} ({kind}, {size_text(saved['bytes'])} "
          f"for {size_text(saved['virtual_size'])})")
    print(_instant_text(saved))
    return 0


def job_line(job: dict[str, Any]) -> str:
    error = (job.get("error") or {}).get("message")
    return (f"job {job['job']} {job['kind']} {job['volume']}: {job['state']} "
            f"{job['progress']}%" + (f" ({error})" if error else ""))


def cmd_job_show(ns: argparse.Namespace) -> int:
    return emit(ns, call(ns, "job-status", {"id": ns.id}), job_line)


def cmd_job_cancel(ns: argparse.Namespace) -> int:
    job = call(ns, "job-cancel", {"id": ns.id})
    while job["state"] == "running":  # until its worker has stopped and cleaned up
        time.sleep(POLL_SECONDS)
        job = call(ns, "job-status", {"id": job["job"]})
    return emit(ns, job, job_line)


def cmd_job_ls(ns: argparse.Namespace) -> int:
    jobs = call(ns, "job-list")
    headers = ("JOB", "KIND", "VOLUME", "STATE", "PROGRESS", "ERROR")
    return emit(ns, jobs, lambda r: table(headers, [
        [j["job"], j["kind"], j["volume"], j["state"], f"{j['progress']}%",
         (j.get("error") or {}).get("code")] for j in r]))


def legacy_job_argv(argv: list[str]) -> list[str]:
    """`gatewayctl [OPTIONS] job ID` (before `job show|cancel|ls`) still shows the job."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    if (i + 1 < len(argv) and argv[i] == "job" and argv[i + 1] not in JOB_COMMANDS
            and not argv[i + 1].startswith("-")):
        return [*argv[:i + 1], "show", *argv[i + 1:]]
    return argv


def register(top: Any, groups: dict[str, Any]) -> None:
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
    p.add_argument("--pool", help="Ceph pool of the new volume: an overlay or copy of an RBD "
                   "volume (default: BASE's), or a blank one (with --ceph-conf, --ceph-user)")
    p.add_argument("--ceph-conf", help="ceph.conf of a blank volume's cluster (with --pool)")
    p.add_argument("--ceph-user", help="ceph user of a blank volume's cluster (with --pool)")
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
                   help="ROOTFS.tar[.gz|.xz|.bz2|.zst] (relative to the working directory)")
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

    p = volume.add_parser(
        "snapshot", help="a point-in-time copy of a volume (mounted or not) as a new volume")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="NEW", help="the new volume's name")
    p.add_argument("--format", choices=["raw", "qcow2"],
                   help="the snapshot's image format (default: the volume's)")
    p.add_argument("--rate-limit", metavar="BYTES_PER_S",
                   help="limit the copy's speed, e.g. 64M (bytes per second)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_snapshot)

    p = volume.add_parser(
        "save", help="write a volume (mounted or not) out as an image file, checked before done")
    p.add_argument("name")
    p.add_argument("file", help="output image (relative to the working directory); never "
                                "overwritten without --force")
    p.add_argument("--format", choices=["raw", "qcow2"], required=True,
                   help="the output image format")
    p.add_argument("--compress", action="store_true", help="compressed qcow2 clusters")
    p.add_argument("--force", action="store_true",
                   help="replace an existing regular file (only once the new one is complete)")
    p.add_argument("--rate-limit", metavar="BYTES_PER_S",
                   help="limit the copy's speed, e.g. 64M (bytes per second)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_save)

    job = top.add_parser(
        "job", help="daemon jobs (volume create/import/snapshot/save)").add_subparsers(
        dest="job_command", required=True, parser_class=Parser)
    p = job.add_parser("show", help="show a job (also: job ID)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_job_show)
    p = job.add_parser("cancel", help="stop a running job; its partial files are removed")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_job_cancel)
    p = job.add_parser("ls", help="list jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_job_ls)
