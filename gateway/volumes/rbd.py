"""Registering an RBD image as a volume (the pinned format comes from the image's metadata), and
making overlays of one in the cluster.

`examine` reads the image (size and the gateway's metadata keys) and settles its pinned facts
with what the admin declared (gateway.ceph.meta.settle); it returns the catalog row, where the
image lives, and the keys still to be written to the image. Nothing is written here: the caller
writes the keys, then inserts the row, once it knows the name is free.

`make_overlay` is `volume create NAME --from BASE --overlay` on an RBD base: a protected
snapshot of the base and a copy-on-write clone of it named NAME (in the base's pool, or
`--pool`), carrying the gateway's keys (format raw, origin overlay, base = the base's spec,
overwriting what librbd copied from the base). There is no qcow2 chain: the clone is a plain raw
RBD volume, independent of later writes to the base. The catalog row records that this gateway
made the clone (lineage `made_here`), so `volume rm` removes it from the cluster (and the
snapshot when no other clone uses it: `drop_made`).

Blocking (librbd): call from a worker thread.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.catalog import Volume
from gateway.ceph import client
from gateway.ceph.leases import LOCK_NAME, lease_object
from gateway.ceph.location import NAME_RE, RbdImage, parse_spec
from gateway.ceph.meta import BASE_KEY, FORMAT_KEY, FSTYPE_KEY, ORIGIN_KEY, settle
from gateway.errors import Cancelled, Conflict, FormatError, InvalidArgument
from gateway.volumes import lifecycle
from gateway.volumes.lifecycle import Progress
from gateway.volumes.register import check_fstype, check_name


@dataclass(frozen=True)
class Found:
    volume: Volume
    image: RbdImage
    writes: dict[str, str]  # metadata keys to write to the image before the row is inserted


def examine(name: object, spec: object, *, conf: object, user: object,
            declared_format: str | None, fstype: object = None, read_only: bool = False,
            nosuid: bool = True, noexec: bool = False,
            config: client.ClientConfig) -> Found:
    name = check_name(name)
    pinned_fstype = check_fstype(fstype)
    image = parse_spec(spec, conf=conf, user=user)
    facts = client.image_facts(image, config)
    settled = settle(facts.metadata, image.spec, declared_format=declared_format,
                     declared_fstype=pinned_fstype)
    if facts.size % 512 or facts.size == 0:
        raise FormatError(f"rbd image {image.spec}: size {facts.size} is not a positive "
                          "multiple of 512 bytes")
    volume = Volume(name=name, path=image.path, format=settled.format,
                    virtual_size=facts.size, read_only=read_only, nosuid=nosuid,
                    noexec=noexec, header={"rbd": image.to_json(),
                                           "metadata": {**facts.metadata, **settled.writes}},
                    fstype=settled.fstype,
                    lineage={"cluster": {"origin": settled.origin, "base": settled.base}})
    return Found(volume=volume, image=image, writes=settled.writes)


def _child(name: str, base: RbdImage, pool: str | None) -> RbdImage:
    """Where an overlay of `base` lives: image NAME in the base's pool and namespace, or in the
    default namespace of `pool`."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"volume name {name!r} cannot name an RBD image: use 1-100 "
                              "characters from [A-Za-z0-9._-]")
    if pool is None or pool == base.pool:
        return dataclasses.replace(base, image=name)
    return RbdImage(pool=pool, namespace="", image=name, conf=base.conf, user=base.user)


def make_overlay(name: object, base: Volume, image: RbdImage, *, pool: str | None,
                 host_id: str, nosuid: bool = True, noexec: bool = False,
                 config: client.ClientConfig) -> Found:
    """Snapshot + clone `base` (an RBD volume at `image`) as a new volume `name`; refused while
    another host holds the base's writer lease (its snapshot would catch a filesystem in
    motion). Returns the clone's catalog row; the caller inserts it, or calls `drop_made`
    when it cannot (blocking)."""
    return _make_from(name, base, image, "overlay", client.clone, "an overlay", pool=pool,
                      host_id=host_id, nosuid=nosuid, noexec=noexec, config=config)


def make_copy(name: object, source: Volume, image: RbdImage, *, pool: str | None,
              host_id: str, nosuid: bool = True, noexec: bool = False,
              config: client.ClientConfig) -> Found:
    """`volume create NAME --from SOURCE --copy` on an RBD source: a full, independent copy in
    the cluster (librbd's copy: the current data, no snapshots), raw, origin copy (blocking)."""
    return _make_from(name, source, image, "copy", client.copy, "a copy", pool=pool,
                      host_id=host_id, nosuid=nosuid, noexec=noexec, config=config)


def _make_from(name: object, source: Volume, image: RbdImage, origin: str,
               make: Callable[[RbdImage, RbdImage, client.ClientConfig, Mapping[str, str]],
                              None], what: str, *,
               pool: str | None, host_id: str, nosuid: bool, noexec: bool,
               config: client.ClientConfig) -> Found:
    """A new image made from `source` (at `image`) by `make` (clone or copy) with the gateway's
    keys (format raw, `origin`, base = the source's spec, its pinned fstype), examined like any
    registered image and recorded as made here; removed again if that fails. `what` names the
    new volume in a refusal."""
    name = check_name(name)
    dest = _child(name, image, pool)
    _check_unwritten(source, image, host_id, config, what)
    metadata = {FORMAT_KEY: "raw", ORIGIN_KEY: origin, BASE_KEY: image.spec}
    if source.fstype is not None:
        metadata[FSTYPE_KEY] = source.fstype
    make(image, dest, config, metadata)
    try:
        found = examine(name, dest.spec, conf=dest.conf, user=dest.user,
                        declared_format="raw", nosuid=nosuid, noexec=noexec, config=config)
    except BaseException:
        drop_made(dest, config)
        raise
    lineage = {**found.volume.lineage, "source": source.name, "made_here": True}
    volume = dataclasses.replace(found.volume, origin=origin, lineage=lineage)
    return Found(volume=volume, image=dest, writes={})


def make_blank(name: object, image: RbdImage, size: int, fs: str, *, label: str | None,
               partitioned: bool, scratch: Path, progress: Progress | None = None,
               cancel: threading.Event | None = None, nosuid: bool = True,
               noexec: bool = False, config: client.ClientConfig) -> Found:
    """`volume create NAME --size S --mkfs FS --pool POOL`: the filesystem (or GPT disk) is built
    in a raw file under `scratch` (as for a local blank volume), then written into a new image
    of the pool, all-zero chunks skipped; origin blank, fstype pinned (blocking)."""
    name = check_name(name)
    lifecycle.check_blank(size, "raw", fs, label)
    raw = scratch / "image.raw"
    work = scratch / "work"
    work.mkdir(mode=0o700)
    lifecycle.filesystem_image(raw, work, size, fs, "raw", partitioned, label, None,
                               progress, cancel)
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
    client.import_file(str(raw), image, config, {FORMAT_KEY: "raw", ORIGIN_KEY: "blank",
                                                 FSTYPE_KEY: fs})
    try:
        found = examine(name, image.spec, conf=image.conf, user=image.user,
                        declared_format="raw", nosuid=nosuid, noexec=noexec, config=config)
    except BaseException:
        drop_made(image, config)
        raise
    lineage = {**found.volume.lineage, "made_here": True,
               "params": {"size": size, "mkfs": fs, "label": label,
                          "partitioned": partitioned}}
    volume = dataclasses.replace(found.volume, origin="blank", lineage=lineage)
    return Found(volume=volume, image=image, writes={})


def _check_unwritten(base: Volume, image: RbdImage, host_id: str,
                     config: client.ClientConfig, what: str) -> None:
    holders = client.lock_holders(image, config, lease_object(image), LOCK_NAME)
    others = sorted({cookie for _, cookie in holders if cookie != host_id})
    if others:
        raise Conflict(f"volume {base.name}: rbd image {image.spec} is being written by host "
                       f"{', '.join(others)} (it holds the writer lease); {what} needs a "
                       "source nobody writes")


def made_here(volume: Volume) -> bool:
    """Whether this gateway made the RBD image (an overlay clone): removed with the volume."""
    return bool(volume.lineage.get("made_here"))


def drop_made(child: RbdImage, config: client.ClientConfig) -> None:
    """Remove an image this gateway made (a clone, and its snapshot when no other clone uses
    it; or a copy), with its lease object (blocking)."""
    client.remove_clone(child, config, [lease_object(child)])


def check_no_clones(name: str, image: RbdImage, config: client.ClientConfig) -> None:
    """Refuse to remove a base that clones still use (whichever host made them)."""
    clones = client.clones_of(image, config)
    if clones:
        raise Conflict(f"volume {name}: rbd image {image.spec} is the base of clones "
                       f"{', '.join(clones)}; remove them first")
