"""One writer at a time across hosts: this host's leases on RBD images (the adapter around the
pure state machine in gateway/ceph/lease.py).

A lease is a RADOS exclusive lock with a duration, named LOCK_NAME, on a dedicated object next to
the image (`storage-gateway.lease.IMAGE` in the image's pool and namespace), with this host's id
as its cookie. The host also writes its id into the object's HOLDER_XATTR attribute, so that a
refused host can name the holder. A lock belongs to the client instance that took it: each held
lease keeps its own cluster session open, renews through it every duration/4 seconds (`run`),
and is released through it (`release`). It is taken before QSD opens an image writable and kept
until `gatewayctl volume release` (or the volume's removal): closing an export does not hand the
image over, releasing does.

Fencing: a host that takes a lease last held by another host (its lease lapsed: the host died,
hung or lost the cluster) breaks the image's exclusive lock before its QSD opens the image, which
blocklists the previous writer's librbd client: that writer can write no more, and the new one
need not wait for a dead writer's lock to time out.

The fenced side: a lease whose renewal is refused (another host holds the lock now) is fenced at
once; one that lapses (no renewal succeeded before its deadline: gatewayd hung, or the cluster
was away) is lost, and looked at again every duration/4: taken back when nobody else took it in
the meantime (the holder attribute still names this host), fenced otherwise. On entering
`fenced` the host's `on_fenced` handler runs (gatewayd tears the volume's mount and export down,
forcibly: a fenced QSD node fails its flushes), `status` and `volume show` report it, and a
writable open stays refused while the other host holds the lease. A gatewayd that starts finds
the volumes its predecessor was writing (`take(..., resume=True)`) fenced the same way.

A gatewayd restarted on the same host breaks its predecessor's lock (same cookie, another client
instance: found with the `rados` tool, since python3-rados cannot list locks) and takes the
lease back at once, for the exports it adopted and at its next writable open. Host ids must
therefore be unique among the hosts sharing a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gateway.ceph import client
from gateway.ceph.client import ClientConfig, Session
from gateway.ceph.lease import Lease, LeaseEvent, LeaseState
from gateway.ceph.location import RbdImage
from gateway.errors import Conflict, GatewayError, NotFound
from gateway.log import fields

log = logging.getLogger("gateway.ceph.leases")
LOCK_NAME = "storage-gateway.writer"
HOLDER_XATTR = "storage-gateway.holder"
DEFAULT_DURATION = 20.0
TICK = 0.5  # seconds between looks at the deadlines


def lease_object(image: RbdImage) -> str:
    return f"storage-gateway.lease.{image.image}"


@dataclass(eq=False)
class _Entry:
    image: RbdImage
    lease: Lease
    session: Session | None = None
    busy: trio.Lock = field(default_factory=trio.Lock)  # one cluster call at a time
    holder: str | None = None  # fenced: the host that holds the lease now, as it recorded itself


class Leases:
    """This host's leases, by volume name. Blocking cluster calls run in worker threads."""

    def __init__(self, host_id: str, config: ClientConfig, *,
                 duration: float = DEFAULT_DURATION,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host_id = host_id
        self.config = config
        self.duration = duration
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        # Runs (in `run`'s nursery) for each volume that enters `fenced`: tear its data path down.
        self.on_fenced: Callable[[str], Awaitable[None]] | None = None
        self.fencings = 0  # volumes this host found fenced since it started
        self._handlers: trio.Nursery | None = None

    def state(self, name: str) -> LeaseState:
        entry = self._entries.get(name)
        return LeaseState.NONE if entry is None else entry.lease.state

    def fenced(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if e.lease.fenced)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {}
        for name, e in sorted(self._entries.items()):
            out[name] = {"image": e.image.spec, "state": e.lease.state.value,
                         "expires_in": round(max(0.0, e.lease.deadline - now), 1)
                         if e.lease.writable else 0.0}
            if e.lease.fenced:
                out[name]["holder"] = e.holder
        return out

    async def _move(self, name: str, entry: _Entry, event: LeaseEvent, now: float) -> None:
        """Feed one event to the entry's lease; on entering `fenced`, drop the session, note
        the host that holds the lease now and run the fenced handler (caller holds entry.busy)."""
        before = entry.lease.state
        entry.lease = entry.lease.on(event, now)
        if not entry.lease.fenced or before is LeaseState.FENCED:
            return
        await self._drop_session(entry)
        entry.holder = await self._holder(entry.image)
        self.fencings += 1
        log.error("fenced: another host holds the writer lease; tearing this host's export and "
                  "mount down", extra=fields(volume=name, image=entry.image.spec,
                                             holder=entry.holder, event=event.value))
        if self.on_fenced is not None and self._handlers is not None:
            self._handlers.start_soon(self._run_handler, self.on_fenced, name)

    @staticmethod
    async def _run_handler(handler: Callable[[str], Awaitable[None]], name: str) -> None:
        try:
            await handler(name)
        except GatewayError as exc:
            log.error("tearing a fenced volume down failed",
                      extra=fields(volume=name, error=exc.message))

    async def take(self, name: str, image: RbdImage, *, resume: bool = False) -> None:
        """Hold the lease on `image` for volume `name` (a no-op while held); Conflict naming the
        holder while another host holds it. `resume`: this host was writing the image before
        (gatewayd restarted), so another host holding it now means this host was fenced."""
        entry = self._entries.get(name)
        if entry is None or entry.image != image:
            entry = self._entries[name] = _Entry(image, Lease(self.duration))
        async with entry.busy:
            if entry.lease.writable and not entry.lease.lapsed(self.clock()):
                return
            if entry.session is None:
                session = Session(image, self.config)
                await client.arun(session.open)
                entry.session = session
            previous = await self._holder(image)
            sent = self.clock()
            try:
                taken = await self._lock(entry) or (
                    await self._reclaim(name, image) and await self._lock(entry))
            except BaseException:
                await self._drop_session(entry)
                raise
            if not taken:
                await self._move(name, entry, LeaseEvent.SUPERSEDED if resume
                                 else LeaseEvent.BUSY, sent)
                await self._drop_session(entry)
                if entry.lease.state is LeaseState.NONE and self._entries.get(name) is entry:
                    del self._entries[name]  # never held: nothing to remember
                holder = await self._holder(image) or "(unknown)"
                raise Conflict(f"volume {name}: rbd image {image.spec} is being written by "
                               f"host {holder} (it holds the writer lease); ask it to run "
                               f"gatewayctl volume release on its volume")
            entry.lease = entry.lease.on(LeaseEvent.TAKEN, sent)
            entry.holder = None
            try:
                await client.arun(entry.session.set_xattr, lease_object(image), HOLDER_XATTR,
                                  self.host_id)
            except GatewayError as exc:  # the lease is ours all the same
                log.warning("could not record the lease holder",
                            extra=fields(volume=name, error=exc.message))
            if previous is not None and previous != self.host_id:
                # Another host wrote last and its lease lapsed (or it released): fence any
                # writer it may have left, before our own QSD opens the image.
                broken = await client.arun(client.break_writers, image, self.config)
                if broken:
                    log.warning("fenced the previous writer", extra=fields(
                        volume=name, image=image.spec, previous=previous, owners=broken))
        log.info("writer lease taken", extra=fields(volume=name, image=image.spec,
                                                    host=self.host_id))

    async def release(self, name: str) -> bool:
        """Give the lease up (unlock it); whether this host held it."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return False
        async with entry.busy:
            held = entry.lease.state is LeaseState.HELD
            if entry.session is not None and held:
                try:
                    await client.arun(entry.session.unlock, lease_object(entry.image),
                                      LOCK_NAME, self.host_id)
                except NotFound:
                    held = False  # it had lapsed already
            entry.lease = entry.lease.on(LeaseEvent.RELEASED, self.clock())
            await self._drop_session(entry)
        log.info("writer lease released", extra=fields(volume=name, image=entry.image.spec))
        return held

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Renew every held lease before it lapses; mark the ones that lapse lost."""
        try:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                task_status.started()
                while True:
                    await trio.sleep(TICK)
                    for name, entry in list(self._entries.items()):
                        await self._tend(name, entry)
        finally:
            self._handlers = None
            with trio.CancelScope(shield=True):
                for entry in list(self._entries.values()):
                    await self._drop_session(entry)

    async def _tend(self, name: str, entry: _Entry) -> None:
        if entry.busy.locked():
            return
        async with entry.busy:
            now = self.clock()
            if entry.lease.lapsed(now):
                entry.lease = entry.lease.on(LeaseEvent.EXPIRED, now)
                log.error("writer lease lapsed: no renewal succeeded in time",
                          extra=fields(volume=name, image=entry.image.spec))
                await self._retry(name, entry, now)  # at once: was it taken over?
                return
            if entry.lease.retry_due(now):
                await self._retry(name, entry, now)
                return
            if not entry.lease.renew_due(now) or entry.session is None:
                return
            try:
                await client.arun(entry.session.lock, lease_object(entry.image), LOCK_NAME,
                                  self.host_id, self.duration)
            except Conflict:
                await self._move(name, entry, LeaseEvent.RENEW_REFUSED, now)
            except GatewayError as exc:
                entry.lease = entry.lease.on(LeaseEvent.RENEW_FAILED, now)
                log.warning("writer lease renewal failed; retrying",
                            extra=fields(volume=name, error=exc.message))
            else:
                entry.lease = entry.lease.on(LeaseEvent.RENEWED, now)

    async def _retry(self, name: str, entry: _Entry, now: float) -> None:
        """A lost lease: take it back if this host is still the last that recorded itself as
        holder (nobody took it meanwhile, so nobody fenced this host's writer); fenced when
        another host did. Unknown (the cluster did not answer): stays lost (caller holds busy)."""
        entry.lease = entry.lease.tried_at(now)
        try:
            holder = await client.arun(client.get_xattr, entry.image, self.config,
                                       lease_object(entry.image), HOLDER_XATTR)
            if holder is not None and holder != self.host_id:
                await self._move(name, entry, LeaseEvent.SUPERSEDED, now)
                return
            if entry.session is None:
                session = Session(entry.image, self.config)
                await client.arun(session.open)
                entry.session = session
            await client.arun(entry.session.lock, lease_object(entry.image), LOCK_NAME,
                              self.host_id, self.duration)
        except Conflict:
            await self._move(name, entry, LeaseEvent.RENEW_REFUSED, now)
        except GatewayError as exc:
            entry.lease = entry.lease.on(LeaseEvent.RENEW_FAILED, now)
            log.warning("a lapsed writer lease could not be looked at; retrying",
                        extra=fields(volume=name, error=exc.message))
        else:
            entry.lease = entry.lease.on(LeaseEvent.TAKEN, now)
            log.warning("lapsed writer lease taken back: no other host took it",
                        extra=fields(volume=name, image=entry.image.spec))

    async def _lock(self, entry: _Entry) -> bool:
        """Take or renew the lock through the entry's session; False while another holds it."""
        assert entry.session is not None
        try:
            await client.arun(entry.session.lock, lease_object(entry.image), LOCK_NAME,
                              self.host_id, self.duration)
        except Conflict:
            return False
        return True

    async def _reclaim(self, name: str, image: RbdImage) -> bool:
        """Break a lock held with this host's id by another client instance: this host's
        previous gatewayd (killed, or restarted while its exports stayed open). Whether there was
        one and it is gone now (then the lock is free for this session to take)."""
        try:
            holders = await client.arun(client.lock_holders, image, self.config,
                                        lease_object(image), LOCK_NAME)
            if not holders or any(cookie != self.host_id for _, cookie in holders):
                return False
            for holder, cookie in holders:
                await client.arun(client.break_lock, image, self.config, lease_object(image),
                                  LOCK_NAME, holder, cookie)
        except GatewayError as exc:
            log.warning("could not reclaim this host's previous lease",
                        extra=fields(volume=name, error=exc.message))
            return False
        log.info("writer lease reclaimed from this host's previous gatewayd",
                 extra=fields(volume=name, image=image.spec, clients=[h for h, _ in holders]))
        return True

    async def _holder(self, image: RbdImage) -> str | None:
        """The host that took the image's lease last, as it recorded itself (None: unknown)."""
        try:
            return await client.arun(client.get_xattr, image, self.config,
                                     lease_object(image), HOLDER_XATTR)
        except GatewayError:
            return None

    @staticmethod
    async def _drop_session(entry: _Entry) -> None:
        session, entry.session = entry.session, None
        if session is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(session.close)
