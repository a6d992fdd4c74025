"""A blocking admin client for gatewayctl, the libvirt hook and scripts."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from gateway import errors
from gateway.admin.protocol import NEED_DATA, ClientConnection, Closed, ConnectionFailed, Response

ERRORS_BY_CODE: dict[str, type[errors.GatewayError]] = {
    cls.code: cls for cls in (
        errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.Conflict,
        errors.FormatError, errors.ProbeError, errors.PermissionDenied, errors.CommandError,
        errors.BackendError, errors.DaemonUnavailable, errors.TooManyConnections)
}


def error_for(code: str, message: str) -> errors.GatewayError:
    cls = ERRORS_BY_CODE.get(code, errors.GatewayError)
    return cls(message, code=code)


class Client:
    """One connection; requests are answered in order."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self._conn = ClientConnection()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.socket_path)
        except FileNotFoundError as exc:
            self._sock.close()
            raise errors.DaemonUnavailable(
                f"gatewayd is not running (no socket at {self.socket_path})") from exc
        except ConnectionRefusedError as exc:
            self._sock.close()
            raise errors.DaemonUnavailable(
                f"gatewayd is not running (nothing listens on {self.socket_path})") from exc
        except PermissionError as exc:
            self._sock.close()
            raise errors.PermissionDenied(
                f"permission denied connecting to {self.socket_path}") from exc
        except OSError as exc:
            self._sock.close()
            raise errors.DaemonUnavailable(
                f"cannot reach gatewayd at {self.socket_path}: {exc.strerror}") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        try:
            self._sock.sendall(self._conn.send(op, args))
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    self._conn.receive_data(self._sock.recv(65536))
                    continue
                break
        except TimeoutError as exc:
            raise errors.DaemonUnavailable(f"gatewayd did not answer {op} in time") from exc
        except OSError as exc:
            raise errors.DaemonUnavailable(f"lost the connection to gatewayd: {exc}") from exc
        if isinstance(event, Response):
            if event.ok:
                return event.result
            raise error_for(event.code, event.message)
        if isinstance(event, Closed):
            raise errors.DaemonUnavailable("gatewayd closed the connection")
        assert isinstance(event, ConnectionFailed)
        raise errors.DaemonUnavailable(f"protocol error from gatewayd: {event.message}")


def call(socket_path: str | Path, op: str, args: dict[str, Any] | None = None,
         timeout: float = 60.0) -> Any:
    with Client(socket_path, timeout=timeout) as client:
        return client.call(op, args)
