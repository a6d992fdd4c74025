"""The facts every host needs about an RBD volume, kept in the image's own metadata (pure).

The image is the truth, the local catalog a cache of it: a second host that registers the same
image finds the pinned format there instead of guessing. Keys live under the gateway's own
prefix (`storage-gateway.`); librbd reads keys starting with `conf_` as configuration overrides,
so that prefix is never used.

`settle` decides, from what the image holds and what the admin declared, what gets pinned and
which keys must be written back. RBD volumes are raw: qcow2 on an image that can grow failed
past its old end, and the clouds that keep instance disks in Ceph all keep raw there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import FormatError

PREFIX = "storage-gateway."
FORMAT_KEY = PREFIX + "format"
FSTYPE_KEY = PREFIX + "fstype"
ORIGIN_KEY = PREFIX + "origin"
BASE_KEY = PREFIX + "base"
KEYS = (FORMAT_KEY, FSTYPE_KEY, ORIGIN_KEY, BASE_KEY)
FORMATS = ("raw",)
QCOW2_REFUSED = ("qcow2 on RBD is not supported: RBD volumes are raw (qcow2 cannot follow an "
                 "image that grows); declare --format raw")


@dataclass(frozen=True)
class Settled:
    """What a registration pins, and the keys to write to the image first."""

    format: str
    fstype: str | None
    origin: str
    base: str | None
    writes: dict[str, str] = field(default_factory=dict)


def ours(metadata: Mapping[str, str]) -> dict[str, str]:
    """The gateway's own keys among an image's metadata."""
    return {k: v for k, v in metadata.items() if k.startswith(PREFIX)}


def settle(metadata: Mapping[str, str], spec: str, *, declared_format: str | None,
           declared_fstype: str | None = None) -> Settled:
    """Reconcile the image's keys with the admin's declaration (FormatError when they clash)."""
    if declared_format is not None and declared_format not in FORMATS:
        if declared_format == "qcow2":
            raise FormatError(f"rbd image {spec}: {QCOW2_REFUSED}")
        raise FormatError(f"rbd image {spec}: unknown format {declared_format!r}")
    writes: dict[str, str] = {}
    stored = metadata.get(FORMAT_KEY)
    if stored is None:
        if declared_format is None:
            raise FormatError(f"rbd image {spec} has no {FORMAT_KEY} key: its format is not "
                              "pinned; declare it with --format raw (written to the image)")
        fmt = declared_format
        writes[FORMAT_KEY] = fmt
    elif stored not in FORMATS:
        if stored == "qcow2":
            raise FormatError(f"rbd image {spec}: its {FORMAT_KEY} is qcow2; {QCOW2_REFUSED}")
        raise FormatError(f"rbd image {spec}: unknown {FORMAT_KEY} value {stored!r}")
    elif declared_format is not None and declared_format != stored:
        raise FormatError(f"rbd image {spec}: --format {declared_format} contradicts the "
                          f"format pinned in the image ({FORMAT_KEY}={stored})")
    else:
        fmt = stored
    fstype = metadata.get(FSTYPE_KEY)
    if declared_fstype is not None:
        if fstype is not None and fstype != declared_fstype:
            raise FormatError(f"rbd image {spec}: --fstype {declared_fstype} contradicts the "
                              f"filesystem type pinned in the image ({FSTYPE_KEY}={fstype})")
        if fstype is None:
            fstype = writes[FSTYPE_KEY] = declared_fstype
    origin = metadata.get(ORIGIN_KEY)
    if origin is None:
        origin = writes[ORIGIN_KEY] = "registered"
    return Settled(format=fmt, fstype=fstype, origin=origin, base=metadata.get(BASE_KEY),
                   writes=writes)
