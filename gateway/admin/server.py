"""The trio adapter for the admin protocol: a Unix socket, peer checks, one task a connection.

Running out of file descriptors (or memory) must not take gatewayd down, since every mount
depends on it: accept errors are logged once per burst and retried with a growing back-off, and
non-root peers may hold at most MAX_CONNECTIONS_PER_UID connections each. A connection over the
cap gets a too-many-connections answer to its first request; past MAX_REFUSALS_PER_UID more, it
is closed at once. Root is not capped (only the back-off protects it).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from gateway.admin.protocol import (
    NEED_DATA,
    BadRequest,
    Closed,
    ConnectionFailed,
    Request,
    ServerConnection,
)
from gateway.errors import (
    Conflict,
    GatewayError,
    InternalError,
    InvalidArgument,
    MalformedRequest,
    PermissionDenied,
    TooManyConnections,
)
from gateway.log import fields
from gateway.tenants.rights import Role
from gateway.tenants.socket import admit_group

log = logging.getLogger("gateway.admin")

MAX_CONNECTIONS_PER_UID = 32
MAX_REFUSALS_PER_UID = 8  # answered refusals in flight per uid; beyond them, closed unanswered
ACCEPT_BACKOFF_MIN = 0.01  # seconds; doubles while accept keeps failing
ACCEPT_BACKOFF_MAX = 1.0
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two logs of a refused uid
# The pending connection went away before accept took it: take the next one at once.
ACCEPT_RETRY_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO})


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    role: Role = Role.ADMIN  # what the access policy admitted it as


Handler = Callable[[Request, Peer], Awaitable[Any]]


def peer_of(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def process_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def _group_id(group: str | None, what: str) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise InvalidArgument(f"{what} group {group} does not exist") from exc


class AccessPolicy:
    """Root, or a member of the admin group (primary or supplementary), may use the socket as an
    admin; a member of the tenant group (and of no admin group) as a tenant, whose requests the
    rights table (gateway.tenants.rights) limits to its own volumes."""

    def __init__(self, admin_group: str | None, tenant_group: str | None = None) -> None:
        self.group_name = admin_group
        self.gid = _group_id(admin_group, "admin")
        self.tenant_group = tenant_group
        self.tenant_gid = _group_id(tenant_group, "tenant")

    def check(self, peer: Peer) -> Role:
        if peer.uid == 0:
            return Role.ADMIN
        groups: set[int] | None = None
        for gid, role in ((self.gid, Role.ADMIN), (self.tenant_gid, Role.TENANT)):
            if gid is None:
                continue
            if groups is None:
                groups = process_groups(peer.pid)
            if peer.gid == gid or gid in groups:
                return role
        parts = ["root", *([f"members of group {self.group_name}"] if self.group_name else []),
                 *([f"tenants (members of group {self.tenant_group})"]
                   if self.tenant_group else [])]
        allowed = " or ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else "root"
        raise PermissionDenied(f"uid {peer.uid} may not use the admin socket (allowed: {allowed})")


class RateLimit:
    """At most one log line per `interval` seconds per key; counts what it held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def ready(self, key: object) -> int | None:
        """None while `key` must stay quiet, else how many were held back since its last log."""
        now = trio.current_time()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 1024:  # forget old keys: many uids must not grow this forever
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            self._held = {k: n for k, n in self._held.items() if k in self._last}
        self._last[key] = now
        return self._held.pop(key, 0)


class AdminServer:
    def __init__(self, path: Path, handler: Handler, policy: AccessPolicy) -> None:
        self.path = path
        self.handler = handler
        self.policy = policy
        self.connections: dict[int, int] = {}  # non-root uid -> open connections
        self._refusal_log = RateLimit(REFUSAL_LOG_INTERVAL)

    def _bind(self) -> trio.socket.SocketType:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale socket from a previous run
            else:
                raise Conflict(f"another gatewayd is serving {self.path}")
            finally:
                probe.close()
        return trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self._bind()
        old_umask = os.umask(0o117)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chown(self.path, 0, self.policy.gid if self.policy.gid is not None else 0)
        os.chmod(self.path, 0o660)
        if self.policy.tenant_gid is not None:
            await trio.to_thread.run_sync(admit_group, self.path, self.policy.tenant_gid)
        sock.listen(128)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._accept_loop(sock, nursery)
        finally:
            sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accept forever. Failures (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) never end the loop:
        the first of a burst is logged, and accept is retried after a back-off that grows from
        ACCEPT_BACKOFF_MIN to ACCEPT_BACKOFF_MAX; the first success logs how many failed."""
        delay = 0.0
        failures = 0
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_RETRY_ERRNOS:
                    log.debug("admin peer left before accept",
                              extra=fields(error=exc.strerror))
                    continue
                if failures == 0:
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    log.warning("admin accept failed; backing off",
                                extra=fields(errno=name, error=exc.strerror))
                failures += 1
                delay = min(ACCEPT_BACKOFF_MAX, delay * 2 if delay else ACCEPT_BACKOFF_MIN)
                await trio.sleep(delay)
                continue
            if failures:
                log.warning("admin accept works again", extra=fields(failures=failures))
                failures, delay = 0, 0.0
            nursery.start_soon(self._serve, conn)

    def _admit(self, peer: Peer) -> Peer | GatewayError:
        """Count the connection (non-root peers), then the peer with its role to serve it, or
        the refusal."""
        if peer.uid == 0:
            return peer
        count = self.connections.get(peer.uid, 0) + 1
        self.connections[peer.uid] = count
        try:
            role = self.policy.check(peer)
        except PermissionDenied as exc:
            return exc
        if count <= MAX_CONNECTIONS_PER_UID:
            return replace(peer, role=role)
        return TooManyConnections(f"uid {peer.uid} has too many admin connections open "
                                  f"(at most {MAX_CONNECTIONS_PER_UID}); close some and retry")

    def _release(self, peer: Peer) -> None:
        count = self.connections.get(peer.uid, 0) - 1
        if count > 0:
            self.connections[peer.uid] = count
        else:
            self.connections.pop(peer.uid, None)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        proto = ServerConnection()
        peer: Peer | None = None
        try:
            peer = peer_of(sock)
            admitted = self._admit(peer)
            if isinstance(admitted, GatewayError):
                refusal = admitted
                # Answered refusals hold an fd for a while: past a few, close unanswered.
                answer = (self.connections.get(peer.uid, 0)
                          <= MAX_CONNECTIONS_PER_UID + MAX_REFUSALS_PER_UID)
                held = self._refusal_log.ready((refusal.code, peer.uid))
                if held is not None:
                    log.warning("refused admin peer",
                                extra=fields(uid=peer.uid, pid=peer.pid, code=refusal.code,
                                             answered=answer, held_back=held))
                if answer:
                    # The first request is answered with the refusal, then the connection closes.
                    await self._refuse(stream, proto, refusal)
                return
            await self._loop(stream, proto, admitted)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionResetError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            if peer is not None and peer.uid != 0:
                self._release(peer)
            await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream, proto: ServerConnection,
                      exc: GatewayError) -> None:
        with trio.move_on_after(5):
            while True:
                event = proto.next_event()
                if event is NEED_DATA:
                    proto.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, (Request, BadRequest)):
                    await stream.send_all(proto.respond_error(event.id, exc.code, exc.message))
                return

    async def _loop(self, stream: trio.SocketStream, proto: ServerConnection, peer: Peer) -> None:
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                proto.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, (Closed, ConnectionFailed)):
                return
            if isinstance(event, BadRequest):
                await stream.send_all(proto.respond_error(event.id, MalformedRequest.code,
                                                          event.message))
                continue
            assert isinstance(event, Request)
            await stream.send_all(await self._answer(proto, event, peer))

    async def _answer(self, proto: ServerConnection, request: Request, peer: Peer) -> bytes:
        try:
            result = await self.handler(request, peer)
        except GatewayError as exc:
            if isinstance(exc, InternalError):  # a bug, not the request's fault: keep the trace
                log.exception("request hit an internal error",
                              extra=fields(op=request.op, error=exc.message))
            else:
                log.info("request failed",
                         extra=fields(op=request.op, code=exc.code, error=exc.message))
            return proto.respond_error(request.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("request crashed", extra=fields(op=request.op))
            return proto.respond_error(request.id, InternalError.code,
                                       f"internal error in {request.op}: {type(exc).__name__}")
        return proto.respond(request.id, result)
