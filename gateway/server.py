"""The trio adapter for the admin protocol: a Unix socket, peer checks, one task a connection."""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gateway.errors import GatewayError, PermissionDenied
from gateway.log import fields
from gateway.protocol import (
    NEED_DATA,
    BadRequest,
    Closed,
    ConnectionFailed,
    Request,
    ServerConnection,
)

log = logging.getLogger("gateway.admin")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


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


class AccessPolicy:
    """Root, or a member of the admin group (primary or supplementary), may use the socket."""

    def __init__(self, admin_group: str | None) -> None:
        self.group_name = admin_group
        self.gid: int | None = None
        if admin_group:
            try:
                self.gid = grp.getgrnam(admin_group).gr_gid
            except KeyError as exc:
                raise GatewayError(f"admin group {admin_group} does not exist",
                                   code="invalid-argument") from exc

    def check(self, peer: Peer) -> None:
        if peer.uid == 0:
            return
        if self.gid is not None and (peer.gid == self.gid or self.gid in process_groups(peer.pid)):
            return
        allowed = f"root or members of group {self.group_name}" if self.group_name else "root"
        raise PermissionDenied(f"uid {peer.uid} may not use the admin socket (allowed: {allowed})")


class AdminServer:
    def __init__(self, path: Path, handler: Handler, policy: AccessPolicy) -> None:
        self.path = path
        self.handler = handler
        self.policy = policy

    def _bind(self) -> trio.socket.SocketType:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale socket from a previous run
            else:
                raise GatewayError(f"another gatewayd is serving {self.path}", code="conflict")
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
        sock.listen(128)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve, conn)
        finally:
            sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        proto = ServerConnection()
        try:
            peer = peer_of(sock)
            try:
                self.policy.check(peer)
            except PermissionDenied as exc:
                log.warning("refused admin peer", extra=fields(uid=peer.uid, pid=peer.pid))
                # The first request is answered with the refusal, then the connection closes.
                await self._refuse(stream, proto, exc)
                return
            await self._loop(stream, proto, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionResetError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
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
                await stream.send_all(proto.respond_error(event.id, "bad-request", event.message))
                continue
            assert isinstance(event, Request)
            await stream.send_all(await self._answer(proto, event, peer))

    async def _answer(self, proto: ServerConnection, request: Request, peer: Peer) -> bytes:
        try:
            result = await self.handler(request, peer)
        except GatewayError as exc:
            log.info("request failed",
                     extra=fields(op=request.op, code=exc.code, error=exc.message))
            return proto.respond_error(request.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("request crashed", extra=fields(op=request.op))
            return proto.respond_error(request.id, "internal",
                                       f"internal error in {request.op}: {type(exc).__name__}")
        return proto.respond(request.id, result)
