"""Where an RBD image lives: pool, namespace, image, and how to reach its cluster (pure, no I/O).

`volume add NAME --rbd POOL[/NAMESPACE]/IMAGE [--ceph-conf PATH] [--ceph-user ID]` names an
image; `parse_spec` checks the spec and `RbdImage` carries it. Names are restricted to a safe
subset of what Ceph accepts (letters, digits, '.', '_', '-'), so a spec can never smuggle an
option into QSD's node or a `rbd` command line.

A volume on RBD is recorded in the catalog with `RbdImage.path` (`rbd:POOL/NAMESPACE/IMAGE`) in
place of a file path: never absolute, so nothing that opens image files can mistake it for one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidArgument

PATH_PREFIX = "rbd:"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_USER = "admin"


def _name(what: str, value: str, spec: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(f"invalid RBD spec {spec!r}: {what} {value!r} must be 1-100 "
                              "characters from [A-Za-z0-9._-], starting with a letter or digit")
    return value


def check_conf(conf: object) -> str | None:
    """A ceph.conf path: absolute, or None for librados' own default search."""
    if conf is None:
        return None
    if not isinstance(conf, str) or not conf.startswith("/") or "\0" in conf:
        raise InvalidArgument(f"ceph conf must be an absolute path, not {conf!r}")
    return conf


def check_user(user: object) -> str:
    """A cephx user id without its `client.` prefix (default: admin)."""
    if user is None:
        return DEFAULT_USER
    if not isinstance(user, str) or not USER_RE.fullmatch(user) or user.startswith("client."):
        raise InvalidArgument(f"invalid ceph user {user!r}: give the id without 'client.', "
                              "1-64 characters from [A-Za-z0-9._-]")
    return user


@dataclass(frozen=True)
class RbdImage:
    pool: str
    namespace: str  # "" for the pool's default namespace
    image: str
    conf: str | None = None  # ceph.conf path; None: librados' default search
    user: str = DEFAULT_USER

    def __post_init__(self) -> None:
        spec = self.spec
        _name("pool", self.pool, spec)
        if self.namespace:
            _name("namespace", self.namespace, spec)
        _name("image", self.image, spec)
        check_conf(self.conf)
        check_user(self.user)

    @property
    def spec(self) -> str:
        """POOL[/NAMESPACE]/IMAGE, as `rbd` writes it."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)

    @property
    def path(self) -> str:
        """What the catalog's path column holds for this image (one volume per image)."""
        return f"{PATH_PREFIX}{self.pool}/{self.namespace}/{self.image}"

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "namespace": self.namespace, "image": self.image,
                "conf": self.conf, "user": self.user}


def parse_spec(spec: object, *, conf: object = None, user: object = None) -> RbdImage:
    """POOL/IMAGE or POOL/NAMESPACE/IMAGE, with the cluster's conf and user."""
    if not isinstance(spec, str) or not spec:
        raise InvalidArgument("an RBD image is required: POOL[/NAMESPACE]/IMAGE")
    parts = spec.split("/")
    if len(parts) == 2:
        pool, namespace, image = parts[0], "", parts[1]
    elif len(parts) == 3:
        pool, namespace, image = parts
        _name("namespace", namespace, spec)
    else:
        raise InvalidArgument(f"invalid RBD spec {spec!r}: use POOL/IMAGE or "
                              "POOL/NAMESPACE/IMAGE")
    return RbdImage(pool=_name("pool", pool, spec), namespace=namespace,
                    image=_name("image", image, spec), conf=check_conf(conf),
                    user=check_user(user))


def is_rbd_path(path: str) -> bool:
    """Whether a catalog path names an RBD image rather than a file."""
    return path.startswith(PATH_PREFIX)
