"""Jobs: the long volume builds (copies, blank volumes, imports, snapshots, saved images) that an
op answers at once.

The admin protocol is one request, one response, so such an op validates its arguments, reserves
the new volume's name (if it makes one) and answers `{"job": ID, ...}`; the work runs in the
background and `job-status` reports `state` (running|done|failed), `progress` (0-100) and, at the
end, the result (the new volume) or the error.

Two kinds of work: a build (`start`) runs in a worker thread and a `finish` registers what it
built; an async body (`start_async`: snapshots and saves, whose copy runs inside QSD and is driven
over QMP from the trio thread) runs on the trio thread and does its own registration.

The Gateway owns one JobTable: the jobs, the names reserved for volumes being made, the job ids,
and the few worker threads jobs run on (their own, so that mounts never wait behind them). Jobs
live in memory and run in the table's nursery (`run`, started by gatewayd).

Stopping a job: its worker gets a `threading.Event` (`stop`), which kills qemu-img and the import
worker and ends the copy loops; an async body gets a `trio.Event` (`cancel`), which it passes to
QSD as a job cancel. `job-cancel` sets both (and cancels a job still waiting for a thread), and so
does a gatewayd shutdown (which also cancels the bodies' tasks: they clean up shielded). A
stopped job ends "failed" with error code "cancelled" whatever the work raised on its way out,
and a volume it built anyway is removed instead of registered. Once registration has begun a job
can no longer be cancelled (an async body checks `cancel` right before it registers, and a
cancel that comes later finds the job done).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from gateway.catalog import Volume
from gateway.errors import (
    AlreadyExists,
    Cancelled,
    Conflict,
    InternalError,
    NotFound,
    first_gateway_error,
)
from gateway.log import fields

log = logging.getLogger("gateway.admin.jobs")
JOB_THREADS = 2
MAX_FINISHED_JOBS = 100
SHUTDOWN = "gatewayd stopped"

Progress = Callable[[float], None]
Build = Callable[[Progress, threading.Event], Volume]  # runs in a worker thread
Finish = Callable[[Volume], Awaitable[dict[str, Any]]]  # registers the built volume
# runs on the trio thread; cleans up after itself; returns the job's result
Body = Callable[[Progress, trio.Event], Awaitable[dict[str, Any]]]


@dataclass(eq=False)
class Job:
    id: str
    kind: str
    volume: str
    state: str = "running"
    progress: float = 0.0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel: trio.Event = field(default_factory=trio.Event, repr=False)  # an async body's stop
    scope: trio.CancelScope = field(default_factory=trio.CancelScope, repr=False)
    stopped_because: str = SHUTDOWN
    registering: bool = False
    reserved: str | None = None  # the volume name the job releases when it ends

    def report(self, percent: float) -> None:
        """The worker's progress callback (a float store: safe from its thread)."""
        self.progress = max(self.progress, min(100.0, percent))

    def halt(self, why: str) -> None:
        """Tell the worker (or the async body) to stop, and stop waiting for a worker thread.
        Called on the trio thread."""
        if not self.stop.is_set():
            self.stopped_because = why
            self.stop.set()
        self.cancel.set()
        self.scope.cancel()

    def to_json(self) -> dict[str, Any]:
        return {"job": self.id, "kind": self.kind, "volume": self.volume, "state": self.state,
                "progress": round(self.progress, 1), "result": self.result, "error": self.error,
                "seconds": round((self.finished or time.time()) - self.started, 3)}


class JobTable:
    def __init__(self, threads: int = JOB_THREADS, keep: int = MAX_FINISHED_JOBS) -> None:
        self._jobs: dict[str, Job] = {}
        self._reserved: set[str] = set()
        self._ids = itertools.count(1)
        self._keep = keep
        self._nursery: trio.Nursery | None = None
        self.limiter = trio.CapacityLimiter(threads)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until cancelled; then tell every running job's worker to stop, and wait."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for job in self._jobs.values():
                    if job.state == "running":
                        job.halt(SHUTDOWN)

    # ---- names of volumes being made -------------------------------------------------------

    def reserve(self, name: str) -> None:
        """Claim a new volume's name (no catalog row, no file yet) until `release`, or until
        the job it is handed to ends."""
        if name in self._reserved:
            raise AlreadyExists(f"volume {name} is being created")
        self._reserved.add(name)

    def release(self, name: str) -> None:
        self._reserved.discard(name)

    def is_reserved(self, name: str) -> bool:
        return name in self._reserved

    # ---- jobs --------------------------------------------------------------------------------

    def start(self, kind: str, name: str, build: Build, finish: Finish) -> Job:
        """Run `build(progress, stop)` in a job thread, then `finish(volume)`; `name` must be
        reserved (the job releases it when it ends)."""
        if self._nursery is None:
            raise InternalError("job table: jobs are not running")
        if name not in self._reserved:
            raise InternalError(f"job table: volume name {name} is not reserved")
        job = Job(id=str(next(self._ids)), kind=kind, volume=name, reserved=name)
        self._jobs[job.id] = job
        self._prune()
        self._nursery.start_soon(self._run, job, build, finish)
        return job

    def start_async(self, kind: str, volume: str, body: Body, *,
                    reserved: bool = True) -> Job:
        """Run `body(progress, cancel)` on the trio thread as a job about `volume`. With
        `reserved` (a job that makes `volume`) the name must be reserved and is released when
        the job ends; without it `volume` is an existing volume the job reads."""
        if self._nursery is None:
            raise InternalError("job table: jobs are not running")
        if reserved and volume not in self._reserved:
            raise InternalError(f"job table: volume name {volume} is not reserved")
        job = Job(id=str(next(self._ids)), kind=kind, volume=volume,
                  reserved=volume if reserved else None)
        self._jobs[job.id] = job
        self._prune()
        self._nursery.start_soon(self._run_async, job, body)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state != "running":
            raise Conflict(f"job {job.id} already ended ({job.state})")
        if job.registering:
            raise Conflict(f"job {job.id} is registering volume {job.volume}; too late to "
                           "cancel it")
        job.halt(f"job {job.id} cancelled")
        log.info("job cancel requested", extra=fields(job=job.id, volume=job.volume))
        return job

    def halt_all(self, why: str = SHUTDOWN) -> None:
        """Tell every running job to stop (`shutdown --all`: a copy holding a volume's lock
        must not make the unmounts behind it wait for the whole copy)."""
        for job in self._jobs.values():
            if job.state == "running" and not job.registering:
                job.halt(why)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != "running"]
        for job in (finished[:-self._keep] if self._keep else finished):
            del self._jobs[job.id]

    async def _build(self, job: Job, build: Build) -> Volume:
        volume: Volume | None = None
        try:
            with job.scope:  # job-cancel ends a wait for a job thread; a running thread finishes
                volume = await trio.to_thread.run_sync(build, job.report, job.stop,
                                                       limiter=self.limiter)
        except Exception as exc:
            if job.stop.is_set():  # whatever the worker raised when it was told to stop
                raise Cancelled(job.stopped_because) from exc
            raise
        if job.stop.is_set():
            if volume is not None:  # finished as it was told to stop: not registered
                Path(volume.path).unlink(missing_ok=True)
            raise Cancelled(job.stopped_because)
        assert volume is not None
        return volume

    async def _run(self, job: Job, build: Build, finish: Finish) -> None:
        async def work() -> dict[str, Any]:
            volume = await self._build(job, build)
            job.registering = True
            with trio.CancelScope(shield=True):  # a built image is registered or removed
                result = await finish(volume)
            return result
        await self._settle(job, work)

    async def _run_async(self, job: Job, body: Body) -> None:
        async def work() -> dict[str, Any]:
            try:
                return await body(job.report, job.cancel)
            except Exception as exc:
                if job.stop.is_set():  # whatever the body raised when it was told to stop
                    raise Cancelled(job.stopped_because) from exc
                raise
        await self._settle(job, work)

    async def _settle(self, job: Job, work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Run a job's work and record how it ended."""
        try:
            job.result = await work()
            job.progress = 100.0
            job.state = "done"
        except Exception as exc:
            error = first_gateway_error(exc)
            if error is None or isinstance(error, InternalError):
                job.state = "failed"
                job.error = {"code": InternalError.code,
                             "message": error.message if error is not None else str(exc)}
                log.exception("job crashed", extra=fields(job=job.id, volume=job.volume))
            else:
                job.state, job.error = "failed", {"code": error.code, "message": error.message}
                log.warning("job failed", extra=fields(job=job.id, volume=job.volume,
                                                       code=error.code, error=error.message))
        finally:
            job.finished = time.time()
            if job.state == "running":  # trio cancelled it: gatewayd is stopping
                job.state = "failed"
                job.error = {"code": Cancelled.code, "message": job.stopped_because}
            if job.reserved is not None:
                self._reserved.discard(job.reserved)
