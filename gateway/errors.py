"""The gateway's error family. Every error carries a stable `code` used by the admin protocol.

One class per code lives here (FAMILY); modules may subclass them for their own failures, but
never invent a code, so the client can map every code the daemon sends back to a class.

`errno` is carried in one place: the optional `errno=` keyword of GatewayError, set by the
adapters that meet an OS or libnbd error (mounts, loop devices, the file and NBD backends), and
read by whoever must answer with an errno (the FUSE block view) or branch on one.

Two codes are not the user's doing: `internal` (InternalError: a bug or a misuse of an internal
interface, such as a QMP core driven out of order) and `cancelled` (a job stopped on request or by
a gatewayd shutdown).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a user. `str(err)` is one line."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message.replace("\n", " ").strip())
        if code is not None:
            self.code = code
        self.errno = errno  # the OS (or NBD server) error number behind it, when there is one

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InternalError(GatewayError):
    """A programming error inside the gateway (an interface used wrongly, a table that does not
    agree with its handlers): never the request's fault and never a backend failure."""

    code = "internal"


class InvalidArgument(GatewayError):
    code = "invalid-argument"


class MalformedRequest(GatewayError):
    """A line on the admin socket that is not a request at all (the server answers it)."""

    code = "bad-request"


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


class Forbidden(GatewayError):
    """A peer that may use the admin socket asked for something its role has no right to (a
    tenant naming another's volume, a host path, an admin-only op). `reason` is a short stable
    word for metrics (gateway_refusals{reason})."""

    code = "forbidden"
    reason = "forbidden"


class CommandError(GatewayError):
    """An external command failed; the message names the command and its last stderr line."""

    code = "command-failed"


class BackendError(GatewayError):
    """A component the gateway drives (QSD, libnbd, FUSE, libvirt) failed."""

    code = "backend-error"


class ClusterError(BackendError):
    """A Ceph cluster could not be reached in time, or refused a request (gateway/ceph maps
    every librados and librbd error to this family)."""


class TeardownError(BackendError):
    """A teardown finished but left pieces of a volume's attachment behind."""

    code = "teardown-incomplete"


class CatalogError(GatewayError):
    """The SQLite catalog could not be opened, migrated or written."""

    code = "catalog-error"


class Cancelled(GatewayError):
    """A job stopped before it finished: `job-cancel`, or gatewayd shutting down."""

    code = "cancelled"


class TooManyConnections(GatewayError):
    """A non-root peer holds more admin connections than its cap."""

    code = "too-many-connections"


class DaemonUnavailable(GatewayError):
    """gatewayctl or the hook cannot reach gatewayd (raised on the client side only)."""

    code = "daemon-unavailable"


# One class per code, the most general one: what a client turns a code back into.
FAMILY: tuple[type[GatewayError], ...] = (
    InternalError, InvalidArgument, MalformedRequest, NotFound, AlreadyExists, Conflict,
    FormatError, ProbeError, PermissionDenied, Forbidden, CommandError, BackendError,
    TeardownError, CatalogError, Cancelled, TooManyConnections, DaemonUnavailable,
)


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
