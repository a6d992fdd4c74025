"""Point-in-time copies inside qemu-storage-daemon: a backup job from a live node to a new image.

    target = BackupTarget(job_id="snap-web-1", path="/proc/123/fd/7", fmt="qcow2")
    await run_backup(qmp, source_node, target, on_started=thaw, progress=report, cancel=event)

The point in time is the moment `blockdev-backup` returns: QSD puts a copy-before-write filter
above the source node, so every later write to the source (through its NBD export, by a running
container) first saves the old data for the job. The copy itself then runs in the background and
the caller can let the guest go (thaw) as soon as the job exists.

The target is an image the caller created (qemu-img create, explicit format); it is opened as two
explicit nodes, `file` then the pinned format, and a qcow2 target gets `backing: null`: nothing
is ever probed or opened from a header. `sync: full` copies everything the source shows (an
overlay's chain comes out flattened). A `rate_limit` (QSD's `speed`, bytes/s) keeps a copy from
taking the host's whole disk bandwidth. Commands are built by pure functions (tested without I/O)
and sent by `run_backup`, which never leaves a job behind in QSD: a cancel, an error or the
caller's own cancellation stops QSD's job (`block-job-cancel`) before the target's nodes go.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from gateway.errors import BackendError, Cancelled, InvalidArgument
from gateway.nbd.qmp import Event, QMPError
from gateway.nbd.qmp_trio import EventWatcher, QMPClient

Format = Literal["raw", "qcow2"]
POLL_SECONDS = 0.2
STOP_WAIT = 30.0  # seconds a cancelled job may take to go
# bytes/s of a job held back until `on_started` has run: it copies its first chunk and then
# waits, so the guest's first writes after a thaw are not queued behind the copy's burst
HELD_SPEED = 1
# How the copy runs beside a guest that writes and fsyncs (bench/snapshot.py, 1 GiB, 2-core VM):
# with the target in the host page cache and QSD's default 64 parallel copy tasks, a writer's
# fsync waited up to 0.6-1.3 s behind the copy (its journal commit on the host had to write out
# the target's dirty pages, and its copy-before-write queued behind the job's); with O_DIRECT
# target writes and 4 tasks it waits about as long as the freeze (50-80 ms), and the copy is as
# fast as before. A filesystem without O_DIRECT (tmpfs) gets a cached target instead.
COPY_WORKERS = 4
END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


@dataclass(frozen=True)
class BackupTarget:
    job_id: str
    path: str  # what QSD opens: the caller's /proc/<pid>/fd/N name of the new image
    fmt: Format
    compress: bool = False
    rate_limit: int | None = None  # bytes per second of the copy (QSD's `speed`), None: no limit

    def __post_init__(self) -> None:
        if self.fmt not in ("raw", "qcow2"):
            raise InvalidArgument(f"backup target: unknown format {self.fmt!r}")
        if self.compress and self.fmt != "qcow2":
            raise InvalidArgument("only a qcow2 target can be compressed")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise InvalidArgument("rate_limit must be a positive number of bytes per second")

    @property
    def nodes(self) -> tuple[str, str]:
        """(format node, protocol node) names, valid qemu ids whatever the job id is."""
        h = hashlib.sha256(self.job_id.encode()).hexdigest()[:16]
        return f"gtf-{h}", f"gtp-{h}"


def target_commands(target: BackupTarget, *,
                    direct: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The blockdev-add commands of the target image: protocol node first. `direct`: the
    target's writes bypass the host page cache (see DIRECT_TARGET)."""
    fmt_node, proto_node = target.nodes
    fmt_args: dict[str, Any] = {"driver": target.fmt, "node-name": fmt_node, "file": proto_node,
                                "read-only": False, "auto-read-only": False,
                                "discard": "unmap", "detect-zeroes": "unmap"}
    if target.fmt == "qcow2":
        fmt_args["backing"] = None
    return [
        ("blockdev-add", {"driver": "file", "node-name": proto_node, "filename": target.path,
                          "locking": "on", "read-only": False, "auto-read-only": False,
                          "cache": {"direct": direct}}),
        ("blockdev-add", fmt_args),
    ]


def backup_args(source_node: str, target: BackupTarget, *,
                held: bool = False) -> dict[str, Any]:
    """`held`: start the job at HELD_SPEED (see run_backup); otherwise at its rate limit."""
    args = {"job-id": target.job_id, "device": source_node, "target": target.nodes[0],
            "sync": "full", "compress": target.compress, "auto-finalize": True,
            "auto-dismiss": True, "x-perf": {"max-workers": COPY_WORKERS}}
    if held:
        args["speed"] = HELD_SPEED
    elif target.rate_limit is not None:
        args["speed"] = target.rate_limit
    return args


def release_args(target: BackupTarget) -> dict[str, Any]:
    """block-job-set-speed of a held job: its rate limit, or 0 (no limit)."""
    return {"device": target.job_id, "speed": target.rate_limit or 0}


def cancel_args(job_id: str) -> dict[str, Any]:
    return {"device": job_id, "force": True}


def job_progress(jobs: Any, job_id: str) -> float | None:
    """Percent done of `job_id` in a query-jobs answer, None if it is not listed."""
    if not isinstance(jobs, list):
        return None
    for job in jobs:
        if isinstance(job, dict) and job.get("id") == job_id:
            done, total = job.get("current-progress"), job.get("total-progress")
            if isinstance(done, int) and isinstance(total, int) and total > 0:
                return 100.0 * done / total
            return 0.0
    return None


async def _delete_nodes(qmp: QMPClient, nodes: list[str]) -> None:
    for node in reversed(nodes):
        with contextlib.suppress(QMPError, BackendError):
            await qmp.execute("blockdev-del", {"node-name": node})


async def run_backup(qmp: QMPClient, source_node: str, target: BackupTarget, *,
                     on_started: Callable[[], Awaitable[None]] | None = None,
                     progress: Callable[[float], None] | None = None,
                     cancel: trio.Event | None = None, hold: bool = False) -> None:
    """Copy `source_node` as it is now into `target`. `on_started` runs once the point in time
    is fixed (also when the job fails to start, so a freeze is always released); `cancel` stops
    the job (Cancelled is raised). Whatever ends the wait (an error, a cancel, the caller's trio
    cancellation), QSD's job is stopped before this returns, and the target's nodes are removed;
    the file is the caller's.

    `hold`: the job starts at HELD_SPEED and gets its real speed only once `on_started` has
    returned. A thaw (ext4 writes its superblock as it thaws) then competes only with the
    copy-before-write of what it writes, not with the job's first burst of copying, which made
    a thaw take hundreds of milliseconds here."""
    added: list[str] = []
    notified = False
    asked = False  # blockdev-backup was sent: a job may exist
    ended: EventWatcher | None = None
    event: Event | None = None
    try:
        await _add_target(qmp, target, added)
        ended = qmp.watch(lambda ev: ev.name in END_EVENTS
                          and ev.data.get("device") == target.job_id)
        try:
            asked = True
            await qmp.execute("blockdev-backup", backup_args(source_node, target, held=hold))
        finally:
            notified = True
            if on_started is not None:
                with trio.CancelScope(shield=True):
                    await on_started()
        if hold:
            with contextlib.suppress(QMPError):  # a small copy may be over already
                await qmp.execute("block-job-set-speed", release_args(target))
        event = await _follow(qmp, target.job_id, ended, progress, cancel)
        if event.name == "BLOCK_JOB_CANCELLED":
            raise Cancelled(f"backup {target.job_id} cancelled")
        error = event.data.get("error")
        if error:
            raise BackendError(f"backup {target.job_id} failed: {error}")
        if progress is not None:
            progress(100.0)
    except QMPError as exc:
        raise BackendError(f"backup {target.job_id}: {exc.desc}") from exc
    finally:
        with trio.CancelScope(shield=True):
            if not notified and on_started is not None:
                await on_started()
            if asked and event is None and ended is not None:
                await _stop_job(qmp, target.job_id, ended)
            if ended is not None:
                qmp.unwatch(ended)
            await _delete_nodes(qmp, added)


async def _add_target(qmp: QMPClient, target: BackupTarget, added: list[str]) -> None:
    """Open the target's nodes (names appended to `added` as they exist): O_DIRECT, or cached
    where the filesystem refuses O_DIRECT."""
    for direct in (True, False):
        try:
            for command, args in target_commands(target, direct=direct):
                await qmp.execute(command, args)
                added.append(args["node-name"])
            return
        except QMPError:
            if not direct or added:
                raise  # the cached open failed too, or the format node did
            continue


async def _stop_job(qmp: QMPClient, job_id: str, ended: EventWatcher) -> None:
    """Cancel QSD's job (if there is one) and wait, bounded, until it has gone."""
    try:
        await qmp.execute("block-job-cancel", cancel_args(job_id))
    except (QMPError, BackendError):
        return  # no such job (it never started, or it ended), or QSD is gone
    with trio.move_on_after(STOP_WAIT):
        await _first(ended.seen, qmp.closed)  # a QSD that went away took its job along


async def _follow(qmp: QMPClient, job_id: str, ended: EventWatcher,
                  progress: Callable[[float], None] | None,
                  cancel: trio.Event | None) -> Event:
    """Wait for the job's end event, reporting progress and passing a cancel on to QSD."""
    cancelled = False
    while not ended.seen.is_set():
        if cancel is not None and cancel.is_set() and not cancelled:
            cancelled = True
            with contextlib.suppress(QMPError):
                await qmp.execute("block-job-cancel", cancel_args(job_id))
        with trio.move_on_after(POLL_SECONDS):
            if cancel is None or cancelled:
                await ended.seen.wait()
            else:
                await _first(ended.seen, cancel)
        if ended.seen.is_set():
            break
        if progress is not None and not cancelled:
            done = job_progress(await qmp.execute("query-jobs"), job_id)
            if done is not None:
                progress(done)
    return await ended.wait()


async def _first(*events: trio.Event) -> None:
    """Return as soon as one of `events` is set."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)
