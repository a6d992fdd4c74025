"""The gateway's error types. Every error carries a stable `code` used by the admin protocol."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a user. `str(err)` is one line."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message.replace("\n", " ").strip())
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidArgument(GatewayError):
    code = "invalid-argument"


class NotFound(GatewayError):
    code = "not-found"


class AlreadyExists(GatewayError):
    code = "already-exists"


class Conflict(GatewayError):
    """The request is valid but the current state refuses it (busy, in use, exported)."""

    code = "conflict"


class FormatError(GatewayError):
    """An image does not match its declared format, or uses a feature the gateway refuses."""

    code = "format-error"


class ProbeError(GatewayError):
    """The probe could not find a mountable rootfs."""

    code = "probe-error"


class PermissionDenied(GatewayError):
    code = "permission-denied"


class CommandError(GatewayError):
    """An external command failed; the message names the command and its last stderr line."""

    code = "command-failed"


class BackendError(GatewayError):
    """A component the gateway drives (QSD, libnbd, FUSE, libvirt) failed."""

    code = "backend-error"


class TooManyConnections(GatewayError):
    """A non-root peer holds more admin connections than its cap."""

    code = "too-many-connections"


class DaemonUnavailable(GatewayError):
    code = "daemon-unavailable"


def first_gateway_error(exc: BaseException) -> GatewayError | None:
    """The first GatewayError in `exc`, looking inside (nested) exception groups."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_gateway_error(inner)
            if found is not None:
                return found
    return None
