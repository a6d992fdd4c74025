"""A blocking admin client for gatewayctl, the libvirt hook and scripts."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.admin.protocol import NEED_DATA, ClientConnection, Closed, ConnectionFailed, Response

if TYPE_CHECKING:
    from pathlib import Path  # annotations only: pathlib costs gatewayctl milliseconds to import

# Seconds a client waits for a gatewayd that does not listen yet (a restart, an upgrade).
CONNECT_WAIT = 5.0
# Every code gatewayd can send, back to its class (errors.FAMILY has one class per code).
ERRORS_BY_CODE: dict[str, type[errors.GatewayError]] = {cls.code: cls for cls in errors.FAMILY}


def error_for(code: str, message: str) -> errors.GatewayError:
    """The error an answer's code and message stand for (a code from a newer gatewayd keeps its
    code on a plain GatewayError)."""
    cls = ERRORS_BY_CODE.get(code, errors.GatewayError)
    return cls(message, code=code)


class Client:
    """One connection; requests are answered in order."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0,
                 wait: float | None = None) -> None:
        """`wait`: seconds to keep trying while nothing listens (a gatewayd restarting); default
        GATEWAY_CONNECT_WAIT or CONNECT_WAIT."""
        self.socket_path = str(socket_path)
        self._conn = ClientConnection()
        deadline = time.monotonic() + (connect_wait() if wait is None else wait)
        pause = 0.02
        while True:
            try:
                self._sock = self._connect(timeout)
                return
            except errors.DaemonUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except FileNotFoundError as exc:
            sock.close()
            raise errors.DaemonUnavailable(
                f"gatewayd is not running (no socket at {self.socket_path})") from exc
        except ConnectionRefusedError as exc:
            sock.close()
            raise errors.DaemonUnavailable(
                f"gatewayd is not running (nothing listens on {self.socket_path})") from exc
        except PermissionError as exc:
            sock.close()
            raise errors.PermissionDenied(
                f"permission denied connecting to {self.socket_path}") from exc
        except OSError as exc:
            sock.close()
            raise errors.DaemonUnavailable(
                f"cannot reach gatewayd at {self.socket_path}: {exc.strerror}") from exc
        return sock

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
         timeout: float = 60.0, wait: float | None = None) -> Any:
    with Client(socket_path, timeout=timeout, wait=wait) as client:
        return client.call(op, args)


def connect_wait() -> float:
    """Seconds a client keeps trying to reach a gatewayd that is not listening (restarting):
    GATEWAY_CONNECT_WAIT, else CONNECT_WAIT."""
    value = os.environ.get("GATEWAY_CONNECT_WAIT")
    if not value:
        return CONNECT_WAIT
    try:
        seconds = float(value)
    except ValueError:
        raise errors.InvalidArgument(f"GATEWAY_CONNECT_WAIT={value!r} is not a number of "
                                     "seconds") from None
    if not 0 <= seconds <= 3600:
        raise errors.InvalidArgument(f"GATEWAY_CONNECT_WAIT: choose 0 to 3600 seconds, "
                                     f"not {value}")
    return seconds
