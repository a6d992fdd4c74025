"""gatewayd's long-lived components, each in a supervised task.

A component is an async callable that takes `task_status`, reports readiness with
`task_status.started()` and runs until cancelled (the QSD supervisor, the libvirt watcher, the job
table, the admin server, the data-plane watcher). `Supervisor.supervise` runs one:

- The first start is the daemon's: if the component fails before it is ready, that error is
  gatewayd's start-up error (nothing can be served without it).
- After that, a failure (any Exception, also one that reaches it inside an exception group) never
  escapes to the daemon's root nursery: it is logged with the component's name, counted
  (`health()`, `status`, the `gateway_component_failures` metric) and the component is started
  again after a backoff that doubles up to BACKOFF_MAX and starts over once a run lasted
  STABLE_AFTER seconds.
- A component that returns on its own has ended: it is not restarted.

Cancellation (gatewayd stopping) passes through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from gateway.log import fields

log = logging.getLogger("gateway.supervisor")
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0


class Component(Protocol):
    def __call__(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


@dataclass
class ComponentHealth:
    name: str
    running: bool = False
    failures: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"running": self.running, "failures": self.failures,
                "last_error": self.last_error}


def describe(exc: BaseException) -> str:
    """One line for a failure, the innermost exceptions of a group named one by one."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _unwrapped(exc: Exception) -> Exception:
    """The one exception a chain of one-member groups carries (a start-up error as its
    component raised it), else the group itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Supervisor:
    def __init__(self, *, backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX,
                 stable_after: float = STABLE_AFTER) -> None:
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.components: dict[str, ComponentHealth] = {}
        # Called with the component's name after each failure (metrics hook in here).
        self.on_failure: list[Callable[[str], None]] = []

    def health(self) -> dict[str, dict[str, Any]]:
        return {name: h.to_json() for name, h in sorted(self.components.items())}

    async def supervise(self, name: str, component: Component, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if name in self.components:
            raise ValueError(f"component {name} is supervised twice")
        health = self.components[name] = ComponentHealth(name)
        ready = False
        delay = self.backoff_min
        while True:
            began = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(component)
                    health.running = True
                    if not ready:
                        ready = True
                        task_status.started()
            except Exception as exc:
                health.running = False
                if not ready:
                    raise _unwrapped(exc) from None
                health.failures += 1
                health.last_error = describe(exc)
                if trio.current_time() - began >= self.stable_after:
                    delay = self.backoff_min
                log.error("component failed; restarting it", exc_info=exc, extra=fields(
                    component=name, error=health.last_error, failures=health.failures,
                    restart_in=round(delay, 3)))
                for hook in self.on_failure:
                    hook(name)
                await trio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            health.running = False
            log.info("component ended", extra=fields(component=name))
            return
