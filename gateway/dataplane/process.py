"""Finding or starting the data-plane process (gatewayd's side).

`ensure(run_dir)` answers a RemoteView on the data plane serving RUN_DIR: the running one if its
control socket answers (a gatewayd restarted, crashed or upgraded: adopt it), else a new process,
`python -m gateway.dataplane`, started in its own session so that it is nobody's child to take
down: it ends only when told (`stop`). Its log is RUN_DIR/dataplane.log.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

from gateway import command
from gateway.dataplane.service import SOCKET_NAME
from gateway.dataplane.view import RemoteView
from gateway.errors import BackendError, CommandError
from gateway.log import fields

log = logging.getLogger("gateway.dataplane.process")
START_TIMEOUT = 20.0
LOG_NAME = "dataplane.log"


class DataPlaneError(CommandError):
    """The data-plane process could not be started."""


async def running(run_dir: Path) -> RemoteView | None:
    """The data plane serving `run_dir`, if one answers."""
    view = RemoteView(str(run_dir / SOCKET_NAME))
    try:
        status = await view.refresh()
    except BackendError:
        return None
    log.info("data plane found", extra=fields(pid=status.get("pid"),
                                              volumes=sorted(status.get("volumes", {}))))
    return view


async def ensure(run_dir: Path, *, log_level: str = "INFO") -> RemoteView:
    """A RemoteView on the data plane of `run_dir`, starting the process if none answers."""
    found = await running(run_dir)
    if found is not None:
        return found
    (run_dir / SOCKET_NAME).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "gateway.dataplane", "--run-dir", str(run_dir),
            "--log-level", log_level]
    child = command.spawn(argv, stderr_path=str(run_dir / LOG_NAME), error=DataPlaneError)
    with trio.move_on_after(START_TIMEOUT):
        while True:
            if child.poll() is not None:
                raise DataPlaneError("data plane exited at start: "
                                     + command.stderr_tail(str(run_dir / LOG_NAME)))
            found = await running(run_dir)
            if found is not None:
                log.info("data plane started", extra=fields(pid=child.pid))
                return found
            await trio.sleep(0.01)
    raise DataPlaneError(f"data plane not ready after {START_TIMEOUT:g}s: "
                         + command.stderr_tail(str(run_dir / LOG_NAME)))


async def stop(view: RemoteView) -> None:
    """End the data plane (its volumes are unplugged, forcibly)."""
    try:
        await view.call("stop", {"force": True})
    except BackendError as exc:
        log.warning("stopping the data plane failed", extra=fields(error=exc.message))
