"""One error family: every code the daemon can send maps back to a class on the client, errno is
carried in one place, local misuse is `internal` (never backend-error), cancellation is
`cancelled`."""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import trio

import gateway
from gateway import errors
from gateway.admin.client import ERRORS_BY_CODE, Client, error_for
from gateway.admin.protocol import Request
from gateway.admin.server import AccessPolicy, AdminServer, Peer
from gateway.host import mounts
from gateway.nbd import qmp

pytestmark = pytest.mark.timeout(60)


def every_module() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.")]


def all_subclasses(cls: type[errors.GatewayError]) -> set[type[errors.GatewayError]]:
    found: set[type[errors.GatewayError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


@pytest.fixture(scope="module")
def family() -> set[type[errors.GatewayError]]:
    for name in every_module():
        importlib.import_module(name)
    return {errors.GatewayError, *all_subclasses(errors.GatewayError)}


def test_every_gateway_error_code_maps_back_to_an_ancestor(
        family: set[type[errors.GatewayError]]) -> None:
    assert len(family) > len(errors.FAMILY)  # modules did add their own subclasses
    for cls in family:
        assert cls.code in ERRORS_BY_CODE, (cls, cls.code)
        assert issubclass(cls, ERRORS_BY_CODE[cls.code]) or cls is errors.GatewayError, cls


def test_the_family_has_one_class_per_code() -> None:
    codes = [cls.code for cls in errors.FAMILY]
    assert len(codes) == len(set(codes))
    # the codes gatewayd sends itself, outside any class: malformed lines and crashes
    assert {"bad-request", "internal", "cancelled"} <= set(codes)


@pytest.mark.parametrize("cls", errors.FAMILY)
def test_the_client_rebuilds_each_code(cls: type[errors.GatewayError]) -> None:
    err = error_for(cls.code, "it failed")
    assert type(err) is cls and err.code == cls.code and err.message == "it failed"
    unknown = error_for("from-a-newer-daemon", "x")
    assert type(unknown) is errors.GatewayError and unknown.code == "from-a-newer-daemon"


def test_errno_is_carried_by_the_base_class_only(family: set[type[errors.GatewayError]]) -> None:
    assert errors.GatewayError("x").errno is None
    assert errors.BackendError("x", errno=errno.EIO).errno == errno.EIO
    for cls in family:
        assert "errno" not in vars(cls), cls
        init = vars(cls).get("__init__")
        if init is not None and cls is not errors.GatewayError:
            assert "errno" not in inspect.signature(init).parameters, cls


def test_mount_errnos_keep_their_number_and_get_their_code() -> None:
    cases = {errno.EBUSY: errors.Conflict, errno.ENOENT: errors.NotFound,
             errno.EPERM: errors.PermissionDenied, errno.EINVAL: mounts.MountError}
    for number, cls in cases.items():
        err = mounts._error("mount /x on /y (ext4)", number)
        assert type(err) is cls and err.errno == number
        assert err.message == f"mount /x on /y (ext4): {os.strerror(number)}"


@pytest.mark.root
def test_a_real_umount_failure_carries_its_errno(tmp_path: Path) -> None:
    with pytest.raises(errors.GatewayError) as info:
        mounts.umount(tmp_path)  # not a mount point
    assert info.value.errno == errno.EINVAL and info.value.code == "backend-error"


def test_qmp_core_misuse_is_internal_not_backend() -> None:
    conn = qmp.QMPConnection()
    with pytest.raises(errors.InternalError) as info:
        conn.send_command("query-version")  # before the greeting
    assert info.value.code == "internal"
    assert not isinstance(info.value, errors.BackendError)
    # what the peer gets wrong stays a backend error
    conn.receive_data(b"not json\n")
    with pytest.raises(qmp.QMPProtocolError) as peer:
        conn.next_events()
    assert peer.value.code == "backend-error"


@pytest.mark.root  # the admin socket answers root (no admin group here)
async def test_internal_errors_reach_the_client_as_internal(tmp_path: Path) -> None:
    """An op that hits a local misuse (here the QMP core driven out of order) answers
    `internal`, and the client raises InternalError; a cancelled job's code is its own."""
    sock = tmp_path / "admin.sock"

    async def handler(request: Request, peer: Peer) -> Any:
        if request.op == "qmp":
            qmp.QMPConnection().send_command("query-version")
        raise errors.Cancelled("job 1 cancelled")

    server = AdminServer(sock, handler, AccessPolicy(None))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)

        def ask(op: str) -> errors.GatewayError:
            with Client(sock, timeout=10) as client, pytest.raises(errors.GatewayError) as info:
                client.call(op)
            return info.value

        internal = await trio.to_thread.run_sync(ask, "qmp")
        assert type(internal) is errors.InternalError and internal.code == "internal"
        assert "cannot send 'query-version'" in internal.message
        cancelled = await trio.to_thread.run_sync(ask, "job")
        assert type(cancelled) is errors.Cancelled and cancelled.message == "job 1 cancelled"
        nursery.cancel_scope.cancel()
