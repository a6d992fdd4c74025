"""The adapter to librados and librbd (python3-rados, python3-rbd): the one place they are called.

Every call blocks (network round trips to the monitor and the OSDs), so the plain functions here
are for worker threads only; the `a`-prefixed twins run them through trio.to_thread. Each call
opens its own short session: connect, open the pool (and namespace), do the work, close.

The client configuration makes a dead cluster fail fast: the connect, every monitor operation and
every OSD operation give up after `ClientConfig.timeout` seconds (librados waits 300 s by
default). Errors are mapped once, in `_mapped`, into the gateway's family: a missing pool or
image is NotFound, an object lock held by another client Conflict, a refusal PermissionDenied, a
timeout or anything else from the cluster ClusterError.

A `Session` stays connected (a RADOS lock belongs to the client instance that took it: leases
are renewed and released through it). What python3-rados lacks, listing and breaking object
locks, goes through the `rados` tool (gateway.command), with the same timeouts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from gateway import command
from gateway.ceph.location import RbdImage
from gateway.ceph.meta import ours
from gateway.errors import (
    AlreadyExists,
    ClusterError,
    CommandError,
    Conflict,
    GatewayError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
LOCK_FLAG_RENEW = 1  # LIBRADOS_LOCK_FLAG_RENEW


class Health:
    """What the last operation on each cluster (by its ceph.conf) found: whether the cluster
    answered, when, and the last failure. Written from worker threads, read by `status`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clusters: dict[str, dict[str, Any]] = {}

    def note(self, image: RbdImage, failure: GatewayError | None) -> None:
        """An operation on `image`'s cluster ended: anything but a ClusterError (not found,
        refused, locked) means the cluster answered."""
        reachable = not isinstance(failure, ClusterError)
        with self._lock:
            entry = self._clusters.setdefault(image.conf or "default", {
                "reachable": None, "last_ok": None, "last_error": None})
            entry["reachable"] = reachable
            if reachable:
                entry["last_ok"] = _now()
            else:
                entry["last_error"] = {"at": _now(), "message": str(failure)}

    def report(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {conf: dict(entry) for conf, entry in sorted(self._clusters.items())}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class ClientConfig:
    """How long any one cluster operation may take before it fails (seconds), and where the
    outcomes are noted (one Health per gatewayd)."""

    timeout: float = DEFAULT_TIMEOUT
    health: Health = field(default_factory=Health, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 3600:  # also refuses nan
            raise InvalidArgument(f"ceph timeout: choose 0 to 3600 seconds, not {self.timeout}")

    def overrides(self) -> dict[str, str]:
        seconds = str(max(1, round(self.timeout)))
        return {"client_mount_timeout": seconds, "rados_mon_op_timeout": seconds,
                "rados_osd_op_timeout": seconds}


@dataclass(frozen=True)
class ImageFacts:
    size: int
    metadata: dict[str, str]  # the gateway's own keys only


def _modules() -> tuple[Any, Any]:
    """rados and rbd, loaded on first use (Debian's python3-rados and python3-rbd)."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise ClusterError("the Ceph client libraries are not installed (Debian packages "
                           "python3-rados and python3-rbd)") from exc


def _mapped(exc: Exception, image: RbdImage, config: ClientConfig) -> GatewayError:
    """One librados/librbd error as a gateway error."""
    rados, rbd = _modules()
    where = f"rbd image {image.spec}"
    code = getattr(exc, "errno", None)
    if isinstance(exc, rbd.ImageNotFound):
        return NotFound(f"{where}: no such image")
    if isinstance(exc, rbd.ImageExists) or code == errno.EEXIST:
        return AlreadyExists(f"{where}: an image of that name exists already")
    if isinstance(exc, rbd.ImageBusy):
        return Conflict(f"{where}: in use ({exc})")
    if isinstance(exc, rados.ObjectNotFound) or code == errno.ENOENT:
        return NotFound(f"{where}: no such pool or namespace ({exc})")
    if isinstance(exc, rados.TimedOut) or code == errno.ETIMEDOUT:
        conf = image.conf or "the default ceph.conf"
        return ClusterError(f"{where}: ceph cluster ({conf}) not reachable within "
                            f"{config.timeout:g}s")
    if isinstance(exc, rados.ObjectBusy) or code == errno.EBUSY:
        return Conflict(f"{where}: locked by another client ({exc})")
    if isinstance(exc, (rados.PermissionError, rbd.PermissionError)) or code in (
            errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{where}: refused for ceph user {image.user} ({exc})")
    return ClusterError(f"{where}: {exc}", errno=code if isinstance(code, int) else None)


def _check_conf(image: RbdImage) -> None:
    """The named ceph.conf must be a regular file (librados would fail obscurely)."""
    if image.conf is None:
        return
    try:
        st = os.stat(image.conf)
    except OSError as exc:
        raise InvalidArgument(f"ceph conf {image.conf}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"ceph conf {image.conf} is not a regular file")


@contextlib.contextmanager
def _connected(image: RbdImage, config: ClientConfig) -> Iterator[Any]:
    """A connected cluster session, through the image's conf and user (blocking)."""
    rados, _ = _modules()
    _check_conf(image)
    cluster = None
    try:
        try:
            cluster = rados.Rados(conffile=image.conf or "", rados_id=image.user,
                                  conf=config.overrides())
            cluster.connect(timeout=max(1, round(config.timeout)))
        except rados.Error as exc:
            raise _mapped(exc, image, config) from exc
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()


@contextlib.contextmanager
def _pool(cluster: Any, image: RbdImage, config: ClientConfig) -> Iterator[Any]:
    """An I/O context on the image's pool and namespace (blocking)."""
    rados, _ = _modules()
    try:
        ioctx = cluster.open_ioctx(image.pool)
        ioctx.set_namespace(image.namespace)
    except rados.Error as exc:
        raise _mapped(exc, image, config) from exc
    try:
        yield ioctx
    finally:
        ioctx.close()


@contextlib.contextmanager
def _ioctx(image: RbdImage, config: ClientConfig) -> Iterator[Any]:
    """A connected session's I/O context on the image's pool and namespace (blocking)."""
    with _connected(image, config) as cluster, _pool(cluster, image, config) as ioctx:
        yield ioctx


def _call(image: RbdImage, config: ClientConfig, work: Callable[[Any], T]) -> T:
    """Run `work(ioctx)`, librados/librbd errors mapped and the outcome noted (blocking)."""
    rados, rbd = _modules()
    try:
        with _ioctx(image, config) as ioctx:
            try:
                result = work(ioctx)
            except (rados.Error, rbd.Error) as exc:
                raise _mapped(exc, image, config) from exc
    except GatewayError as exc:
        config.health.note(image, exc)
        raise
    config.health.note(image, None)
    return result


def image_facts(image: RbdImage, config: ClientConfig) -> ImageFacts:
    """The image's size and the gateway's metadata keys (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> ImageFacts:
        with rbd.Image(ioctx, image.image, read_only=True) as img:
            metadata = {str(k): str(v) for k, v in img.metadata_list()}
            return ImageFacts(size=int(img.size()), metadata=ours(metadata))
    return _call(image, config, work)


def set_metadata(image: RbdImage, config: ClientConfig, items: Mapping[str, str]) -> None:
    """Write metadata keys to the image (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> None:
        with rbd.Image(ioctx, image.image) as img:
            for key, value in items.items():
                img.metadata_set(key, value)
    _call(image, config, work)


def break_writers(image: RbdImage, config: ClientConfig) -> list[str]:
    """Fence whoever holds the image's exclusive lock (librbd's, taken by a writer's first
    write): break it, which also blocklists that client, so a writer whose lease lapsed can
    write no more and a new writer need not wait for a dead one's lock to time out. Returns the
    owners broken; none when the image has no exclusive-lock feature (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> list[str]:
        with rbd.Image(ioctx, image.image) as img:
            try:
                owners = [(o["mode"], o["owner"]) for o in img.lock_get_owners()]
            except rbd.InvalidArgument:
                return []  # no exclusive-lock feature: nothing to break
            for mode, owner in owners:
                img.lock_break(mode, owner)
            return [str(owner) for _, owner in owners]
    return _call(image, config, work)


def clone_snapshot_name(child: RbdImage) -> str:
    """The parent's snapshot a clone is made from: one per clone, named after it."""
    return ".".join(p for p in ("storage-gateway.clone", child.pool, child.namespace,
                                child.image) if p)


def clone(parent: RbdImage, child: RbdImage, config: ClientConfig,
          metadata: Mapping[str, str]) -> None:
    """An RBD overlay: a protected snapshot of `parent` and a copy-on-write clone of it as
    `child` (same cluster), then `metadata` written to the clone (librbd copied the parent's
    keys: these overwrite them). Undone whole on any failure (blocking)."""
    rados, rbd = _modules()
    snap = clone_snapshot_name(child)
    where = parent

    def undo(p_io: Any, c_io: Any, made: list[str]) -> None:
        with contextlib.suppress(rados.Error, rbd.Error):
            if "clone" in made:
                rbd.RBD().remove(c_io, child.image)
            with rbd.Image(p_io, parent.image) as img:
                if "protected" in made:
                    img.unprotect_snap(snap)
                if "snap" in made:
                    img.remove_snap(snap)

    try:
        with _connected(parent, config) as cluster, _pool(cluster, parent, config) as p_io, \
                _pool(cluster, child, config) as c_io:
            made: list[str] = []
            try:
                with rbd.Image(p_io, parent.image) as img:
                    img.create_snap(snap)
                    made.append("snap")
                    img.protect_snap(snap)
                    made.append("protected")
                where = child
                rbd.RBD().clone(p_io, parent.image, snap, c_io, child.image)
                made.append("clone")
                with rbd.Image(c_io, child.image) as img:
                    for key, value in metadata.items():
                        img.metadata_set(key, value)
            except BaseException as exc:
                undo(p_io, c_io, made)
                if isinstance(exc, (rados.Error, rbd.Error)):
                    raise _mapped(exc, where, config) from exc
                raise
    except GatewayError as exc:
        config.health.note(parent, exc)
        raise
    config.health.note(parent, None)


def copy(source: RbdImage, dest: RbdImage, config: ClientConfig,
         metadata: Mapping[str, str]) -> None:
    """A full, independent copy of `source`'s current data as `dest` (same cluster; librbd reads
    through a clone's parent, copies no snapshot), then `metadata` written to it. Removed again
    on any failure after it was made (blocking)."""
    rados, rbd = _modules()
    where = source
    try:
        with _connected(source, config) as cluster, _pool(cluster, source, config) as s_io, \
                _pool(cluster, dest, config) as d_io:
            try:
                with rbd.Image(s_io, source.image, read_only=True) as img:
                    img.copy(d_io, dest.image)
                where = dest
                try:
                    with rbd.Image(d_io, dest.image) as img:
                        for key, value in metadata.items():
                            img.metadata_set(key, value)
                except BaseException:
                    with contextlib.suppress(rados.Error, rbd.Error):
                        rbd.RBD().remove(d_io, dest.image)
                    raise
            except (rados.Error, rbd.Error) as exc:
                raise _mapped(exc, where, config) from exc
    except GatewayError as exc:
        config.health.note(source, exc)
        raise
    config.health.note(source, None)


IMPORT_CHUNK = 4 << 20


def import_file(path: str, image: RbdImage, config: ClientConfig,
                metadata: Mapping[str, str]) -> None:
    """A new image holding the raw file at `path` (its all-zero chunks left unwritten), then
    `metadata` written to it; removed again on any failure (blocking)."""
    rados, rbd = _modules()

    def work(ioctx: Any) -> None:
        size = os.stat(path).st_size
        rbd.RBD().create(ioctx, image.image, size, old_format=False)
        try:
            with rbd.Image(ioctx, image.image) as img, open(path, "rb") as f:
                offset = 0
                while chunk := f.read(IMPORT_CHUNK):
                    if chunk.count(0) != len(chunk):
                        img.write(chunk, offset)
                    offset += len(chunk)
                img.flush()
                for key, value in metadata.items():
                    img.metadata_set(key, value)
        except BaseException:
            with contextlib.suppress(rados.Error, rbd.Error):
                rbd.RBD().remove(ioctx, image.image)
            raise
    try:
        _call(image, config, work)
    except OSError as exc:
        raise InvalidArgument(f"rbd image {image.spec}: reading {path}: {exc.strerror}") from exc


def resize(image: RbdImage, config: ClientConfig, size: int) -> None:
    """Grow the image to `size` bytes (never shrinks: the caller checked) (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> None:
        with rbd.Image(ioctx, image.image) as img:
            if int(img.size()) < size:
                img.resize(size, allow_shrink=False)
    _call(image, config, work)


def _parent_of(img: Any) -> tuple[str, str, str, str] | None:
    """(pool, namespace, image, snapshot) of a clone's parent; None for an image without."""
    _, rbd = _modules()
    try:
        spec = img.get_parent_image_spec()
    except rbd.ImageNotFound:
        return None
    return (str(spec["pool_name"]), str(spec.get("pool_namespace") or ""),
            str(spec["image_name"]), str(spec["snap_name"]))


def remove_clone(child: RbdImage, config: ClientConfig, objects: Sequence[str] = ()
                 ) -> str | None:
    """Remove an image the gateway made (a clone or a copy) and the RADOS `objects` that go
    with it (its lease object); for a clone, then its parent's snapshot when no other clone
    uses it (unprotected first). The parent's spec, or None when the image had no parent
    (blocking)."""
    rados, rbd = _modules()
    where = child
    try:
        with _connected(child, config) as cluster, _pool(cluster, child, config) as c_io:
            try:
                with rbd.Image(c_io, child.image, read_only=True) as img:
                    parent = _parent_of(img)
                rbd.RBD().remove(c_io, child.image)
                for key in objects:
                    with contextlib.suppress(rados.ObjectNotFound):
                        c_io.remove_object(key)
                if parent is None:
                    return None
                pool, namespace, name, snap = parent
                where = RbdImage(pool, namespace, name, conf=child.conf, user=child.user)
                with _pool(cluster, where, config) as p_io, rbd.Image(p_io, name) as img:
                    img.set_snap(snap)
                    others = list(img.list_children2())
                    img.set_snap(None)
                    if not others and snap.startswith("storage-gateway.clone"):
                        img.unprotect_snap(snap)
                        img.remove_snap(snap)
                return where.spec
            except (rados.Error, rbd.Error) as exc:
                raise _mapped(exc, where, config) from exc
    except GatewayError as exc:
        config.health.note(child, exc)
        raise


def clones_of(image: RbdImage, config: ClientConfig) -> list[str]:
    """Every clone of any snapshot of `image` (POOL[/NAMESPACE]/IMAGE), whichever host made
    it (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> list[str]:
        found: list[str] = []
        with rbd.Image(ioctx, image.image, read_only=True) as img:
            for snap in img.list_snaps():
                img.set_snap(snap["name"])
                for child in img.list_children2():
                    found.append("/".join(str(p) for p in (
                        child.get("pool"), child.get("pool_namespace"), child.get("image"))
                        if p))
            img.set_snap(None)
        return sorted(found)
    return _call(image, config, work)


def check_reachable(image: RbdImage, config: ClientConfig) -> None:
    """Connect and stat the image: raises (within the timeout) when the cluster or the image
    cannot be reached. Run before QSD is asked to open the image, since QSD blocks every export
    while its own librbd waits for a dead cluster (blocking)."""
    _, rbd = _modules()

    def work(ioctx: Any) -> None:
        with rbd.Image(ioctx, image.image, read_only=True) as img:
            img.size()
    _call(image, config, work)


class Session:
    """A cluster connection kept open on the image's pool and namespace: a RADOS lock belongs to
    the client instance that took it, so a lease is renewed and released through the session
    that took it. Blocking methods: worker threads only, one call at a time."""

    def __init__(self, image: RbdImage, config: ClientConfig) -> None:
        self.image = image
        self.config = config
        self._cluster: Any = None
        self._ioctx: Any = None

    def open(self) -> None:
        rados, _ = _modules()
        _check_conf(self.image)
        try:
            self._cluster = rados.Rados(conffile=self.image.conf or "", rados_id=self.image.user,
                                        conf=self.config.overrides())
            self._cluster.connect(timeout=max(1, round(self.config.timeout)))
            self._ioctx = self._cluster.open_ioctx(self.image.pool)
            self._ioctx.set_namespace(self.image.namespace)
        except rados.Error as exc:
            self.close()
            failure = _mapped(exc, self.image, self.config)
            self.config.health.note(self.image, failure)
            raise failure from exc
        self.config.health.note(self.image, None)

    def close(self) -> None:
        ioctx, cluster, self._ioctx, self._cluster = self._ioctx, self._cluster, None, None
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()

    def _do(self, work: Callable[[Any], T]) -> T:
        rados, _ = _modules()
        if self._ioctx is None:
            raise ClusterError(f"rbd image {self.image.spec}: session not open")
        try:
            result = work(self._ioctx)
        except rados.Error as exc:
            failure = _mapped(exc, self.image, self.config)
            self.config.health.note(self.image, failure)
            raise failure from exc
        self.config.health.note(self.image, None)
        return result

    def lock(self, key: str, name: str, cookie: str, duration: float) -> None:
        """Take or renew (librados' RENEW flag: it also takes a free or lapsed lock) an exclusive
        lock on object `key` for `duration` seconds; Conflict while another client holds it."""
        self._do(lambda io: io.lock_exclusive(key, name, cookie, desc="storage-gateway writer",
                                              duration=max(1, round(duration)),
                                              flags=LOCK_FLAG_RENEW))

    def unlock(self, key: str, name: str, cookie: str) -> None:
        """Release a lock this session holds; NotFound when it holds none (it lapsed)."""
        self._do(lambda io: io.unlock(key, name, cookie))

    def set_xattr(self, key: str, attr: str, value: str) -> None:
        self._do(lambda io: io.set_xattr(key, attr, value.encode()))


def get_xattr(image: RbdImage, config: ClientConfig, key: str, attr: str) -> str | None:
    """An attribute of object `key` in the image's pool and namespace; None when it or the
    object is missing (blocking)."""
    rados, _ = _modules()
    with _ioctx(image, config) as ioctx:
        try:
            return bytes(ioctx.get_xattr(key, attr)).decode("utf-8", "replace")
        except (rados.ObjectNotFound, rados.NoData):
            return None
        except rados.Error as exc:
            raise _mapped(exc, image, config) from exc


def _rados_cli(image: RbdImage, config: ClientConfig, *args: str) -> str:
    """Run the `rados` tool on the image's pool and namespace (for what python3-rados lacks:
    listing and breaking object locks); its stdout. Blocking."""
    seconds = str(max(1, round(config.timeout)))
    argv = ["rados", "--id", image.user, "-p", image.pool, "--client-mount-timeout", seconds,
            "--rados-mon-op-timeout", seconds, "--rados-osd-op-timeout", seconds]
    if image.conf is not None:
        argv += ["-c", image.conf]
    if image.namespace:
        argv += ["-N", image.namespace]
    try:
        return command.run([*argv, *args], timeout=config.timeout + 5).text
    except CommandError as exc:
        if "No such file or directory" in exc.message:
            raise NotFound(f"rbd image {image.spec}: {exc.message}") from exc
        raise ClusterError(f"rbd image {image.spec}: {exc.message}") from exc


def lock_holders(image: RbdImage, config: ClientConfig, key: str, name: str
                 ) -> list[tuple[str, str]]:
    """(client, cookie) of every holder of lock `name` on object `key` (blocking)."""
    try:
        text = _rados_cli(image, config, "lock", "info", key, name, "--format", "json")
    except NotFound:
        return []  # no such object, or no such lock
    try:
        lockers = json.loads(text).get("lockers", [])
        return [(str(lk["name"]), str(lk["cookie"])) for lk in lockers]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ClusterError(f"rbd image {image.spec}: unreadable lock info: {exc}") from exc


def break_lock(image: RbdImage, config: ClientConfig, key: str, name: str, holder: str,
               cookie: str) -> None:
    """Break lock `name` on object `key` held by client `holder` with `cookie` (blocking)."""
    _rados_cli(image, config, "lock", "break", key, name, holder, "--lock-cookie", cookie)


async def arun(fn: Callable[..., T], *args: Any) -> T:
    """Run one of the blocking functions above in a worker thread. A cancelled caller does not
    wait for it: the thread ends on its own within the configured timeout."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)
