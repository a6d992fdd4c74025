"""The libvirt adapter boundary: opening connections and mapping libvirt.libvirtError, once.

Everything in gateway.libvirt that calls libvirt-python does it inside `libvirt_errors(...)`, so
only gateway.errors types leave this package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from gateway.errors import AlreadyExists, BackendError, Conflict, GatewayError, NotFound

DEFAULT_URI = "lxc:///"


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them through exceptions."""


libvirt.registerErrorHandler(_quiet, None)


def error_code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


def map_error(exc: libvirt.libvirtError, what: str) -> GatewayError:
    """A gateway error for a libvirt failure while doing `what`."""
    code = error_code(exc)
    text = (exc.get_error_message() or str(exc)).replace("\n", " ").strip()
    message = f"libvirt: {what}: {text}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(message)
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return AlreadyExists(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return Conflict(message)
    return BackendError(message)


@contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise map_error(exc, what) from exc


def connect(uri: str = DEFAULT_URI) -> Any:
    """An open virConnect (blocking)."""
    with libvirt_errors(f"connecting to {uri}"):
        return libvirt.open(uri)


def close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def is_reachable(uri: str = DEFAULT_URI) -> bool:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    close_quietly(conn)
    return True
