"""The attachment journal's entries as typed records, and what is read back from them.

The catalog stores each entry as (step, detail): a step name and a JSON object. `encode` gives
exactly the shapes gatewayd has always written; `decode` reads them back, leniently: a field that
is missing or of the wrong type is None, and a step this version does not know becomes `Unknown`
(so a catalog written by another version still loads, and is still torn down by reconcile).

Entry kinds (detail fields; "phase" is "start" before a step runs, "done" after it):
  export              {auto}: whether the mount made the export itself (then it releases it)
  loop                {phase, file, read_only, standby | device, cache}
  mount               {phase, device, target, fstype, flags, data | device, target}
  bind                {phase, source, target | target}
  fsck                {phase, image | exit}
  fuse2fs             {phase, image, target | pid, target}
  host-view-released  {paths, released}: the host's binds dropped while a container runs
  idmap               {phase, uid_first, gid_first, count, source, target | target}: the rootfs
                      as an idmapped mount of the kernel mount (a user-namespace domain)
  idshift             {phase, uid_first, gid_first, count, source, target | pid, target}: fuse
                      mode's id-shifting layer over fuse2fs's private mount (its pid a hint)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar


class Phase(StrEnum):
    START = "start"
    DONE = "done"


def _str(detail: Mapping[str, object], key: str) -> str | None:
    value = detail.get(key)
    return value if isinstance(value, str) else None


def _int(detail: Mapping[str, object], key: str) -> int | None:
    value = detail.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bool(detail: Mapping[str, object], key: str) -> bool | None:
    value = detail.get(key)
    return value if isinstance(value, bool) else None


def _phase(detail: Mapping[str, object]) -> Phase | None:
    value = detail.get("phase")
    return Phase(value) if value in (Phase.START.value, Phase.DONE.value) else None


def _value(phase: Phase | None) -> str | None:
    return phase.value if phase is not None else None


def _present(pairs: Iterable[tuple[str, object]]) -> dict[str, Any]:
    """The detail object: fields that are None are not written."""
    return {key: value for key, value in pairs if value is not None}


@dataclass(frozen=True)
class ExportStep:
    STEP: ClassVar[str] = "export"
    auto: bool

    def detail(self) -> dict[str, Any]:
        return {"auto": self.auto}

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> ExportStep:
        return cls(auto=bool(detail.get("auto")))


@dataclass(frozen=True)
class LoopStep:
    """start: the window file, read-only, the standby device taken instead of a new one;
    done: the device, whether the standby's page cache was kept."""

    STEP: ClassVar[str] = "loop"
    phase: Phase | None
    file: str | None = None
    device: str | None = None
    read_only: bool | None = None
    standby: str | None = None
    cache: bool | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("file", self.file),
                         ("device", self.device), ("read_only", self.read_only),
                         ("standby", self.standby), ("cache", self.cache)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> LoopStep:
        return cls(_phase(detail), _str(detail, "file"), _str(detail, "device"),
                   _bool(detail, "read_only"), _str(detail, "standby"), _bool(detail, "cache"))


@dataclass(frozen=True)
class MountStep:
    """start: device, target, fstype, flags and data (written even when None); done: device,
    target."""

    STEP: ClassVar[str] = "mount"
    phase: Phase | None
    device: str | None = None
    target: str | None = None
    fstype: str | None = None
    flags: int | None = None
    data: str | None = None

    def detail(self) -> dict[str, Any]:
        out = _present((("phase", _value(self.phase)), ("device", self.device),
                        ("target", self.target), ("fstype", self.fstype), ("flags", self.flags)))
        if self.phase is Phase.START or self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> MountStep:
        return cls(_phase(detail), _str(detail, "device"), _str(detail, "target"),
                   _str(detail, "fstype"), _int(detail, "flags"), _str(detail, "data"))


@dataclass(frozen=True)
class BindStep:
    STEP: ClassVar[str] = "bind"
    phase: Phase | None
    target: str | None = None
    source: str | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("source", self.source),
                         ("target", self.target)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> BindStep:
        return cls(_phase(detail), _str(detail, "target"), _str(detail, "source"))


@dataclass(frozen=True)
class FsckStep:
    """start: the window file e2fsck checks; done: its exit status."""

    STEP: ClassVar[str] = "fsck"
    phase: Phase | None
    image: str | None = None
    exit: int | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("image", self.image),
                         ("exit", self.exit)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> FsckStep:
        return cls(_phase(detail), _str(detail, "image"), _int(detail, "exit"))


@dataclass(frozen=True)
class Fuse2fsStep:
    """start: the window file and the mount target; done: the pid (only a hint for reconcile,
    which checks who that pid is now) and the target."""

    STEP: ClassVar[str] = "fuse2fs"
    phase: Phase | None
    pid: int | None = None
    target: str | None = None
    image: str | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("image", self.image),
                         ("pid", self.pid), ("target", self.target)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> Fuse2fsStep:
        return cls(_phase(detail), _int(detail, "pid"), _str(detail, "target"),
                   _str(detail, "image"))


@dataclass(frozen=True)
class HostViewReleased:
    """The host's paths that were unmounted for a running container, and which of them were."""

    STEP: ClassVar[str] = "host-view-released"
    paths: tuple[str, ...] = ()
    released: tuple[bool, ...] = ()

    def detail(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "released": list(self.released)}

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> HostViewReleased:
        paths, flag = detail.get("paths"), detail.get("released")
        return cls(tuple(p for p in paths if isinstance(p, str)) if isinstance(paths, list)
                   else (),
                   tuple(bool(f) for f in flag) if isinstance(flag, list) else (bool(flag),))


@dataclass(frozen=True)
class IdmapStep:
    """start: the map (host uid and gid of id 0, how many ids), the kernel mount cloned and the
    rootfs path; done: the rootfs path. Replaces the bind step of a user-namespace attachment."""

    STEP: ClassVar[str] = "idmap"
    phase: Phase | None
    uid_first: int | None = None
    gid_first: int | None = None
    count: int | None = None
    source: str | None = None
    target: str | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("uid_first", self.uid_first),
                         ("gid_first", self.gid_first), ("count", self.count),
                         ("source", self.source), ("target", self.target)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> IdmapStep:
        return cls(_phase(detail), _int(detail, "uid_first"), _int(detail, "gid_first"),
                   _int(detail, "count"), _str(detail, "source"), _str(detail, "target"))


@dataclass(frozen=True)
class IdshiftStep:
    """start: the map, fuse2fs's private mount (source) and the rootfs path; done: the layer's
    pid (a hint: reconcile checks who it is now) and the rootfs path. Fuse mode's user-namespace
    attachments: fuse2fs serves RUN_DIR/mnt/VOL, the layer RUN_DIR/rootfs/VOL."""

    STEP: ClassVar[str] = "idshift"
    phase: Phase | None
    uid_first: int | None = None
    gid_first: int | None = None
    count: int | None = None
    source: str | None = None
    target: str | None = None
    pid: int | None = None

    def detail(self) -> dict[str, Any]:
        return _present((("phase", _value(self.phase)), ("uid_first", self.uid_first),
                         ("gid_first", self.gid_first), ("count", self.count),
                         ("source", self.source), ("target", self.target), ("pid", self.pid)))

    @classmethod
    def read(cls, detail: Mapping[str, object]) -> IdshiftStep:
        return cls(_phase(detail), _int(detail, "uid_first"), _int(detail, "gid_first"),
                   _int(detail, "count"), _str(detail, "source"), _str(detail, "target"),
                   _int(detail, "pid"))


@dataclass(frozen=True)
class Unknown:
    """A step this version does not know, kept as it was written."""

    step: str
    raw: Mapping[str, Any] = field(default_factory=dict)

    def detail(self) -> dict[str, Any]:
        return dict(self.raw)


Entry = (ExportStep | LoopStep | MountStep | BindStep | FsckStep | Fuse2fsStep | HostViewReleased
         | IdmapStep | IdshiftStep | Unknown)
KINDS: Mapping[str, type[ExportStep | LoopStep | MountStep | BindStep | FsckStep | Fuse2fsStep
                         | HostViewReleased | IdmapStep | IdshiftStep]] = {
    kind.STEP: kind for kind in (ExportStep, LoopStep, MountStep, BindStep, FsckStep,
                                 Fuse2fsStep, HostViewReleased, IdmapStep, IdshiftStep)}


def decode(step: str, detail: Mapping[str, Any]) -> Entry:
    kind = KINDS.get(step)
    if kind is None or not isinstance(detail, Mapping):
        return Unknown(step, dict(detail) if isinstance(detail, Mapping) else {})
    return kind.read(detail)


def encode(entry: Entry) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, Unknown):
        return entry.step, entry.detail()
    return entry.STEP, entry.detail()


def decode_all(entries: Iterable[tuple[str, Mapping[str, Any]] | Entry]) -> list[Entry]:
    """Entries as records, whether given as records or as (step, detail) pairs."""
    return [decode(*e) if isinstance(e, tuple) else e for e in entries]


def phase_of(entry: Entry) -> Phase | None:
    return getattr(entry, "phase", None)


# What the attachment manager, reconcile and gatewayd's start read back.
def loop_devices(entries: Iterable[Entry]) -> set[str]:
    """Loop devices the journal names (the loop step's device, the device a mount used)."""
    found = {e.device for e in entries
             if isinstance(e, LoopStep | MountStep) and e.device is not None}
    return {d for d in found if os.path.basename(d).startswith("loop")}


def fuse2fs_pids(entries: Iterable[Entry]) -> set[int]:
    """fuse2fs pids the journal names: only hints, reconcile checks who each pid is now."""
    return {e.pid for e in entries
            if isinstance(e, Fuse2fsStep) and e.pid is not None and e.pid > 1}


def started_fuse2fs(entries: Iterable[Entry]) -> bool:
    """Whether the attachment got as far as starting fuse2fs."""
    return any(isinstance(e, Fuse2fsStep) for e in entries)


def made_own_export(entries: Iterable[Entry]) -> bool:
    """Whether the journalled mount exported its volume itself (and so must release it)."""
    return any(isinstance(e, ExportStep) and e.auto for e in entries)


def host_view_released(entries: Iterable[Entry]) -> bool:
    """Whether the host's view was released, by the last such entry."""
    released = False
    for e in entries:
        if isinstance(e, HostViewReleased):
            released = any(e.released)
    return released


def idshift_pids(entries: Iterable[Entry]) -> set[int]:
    """Id-shifting layer pids the journal names: only hints, like fuse2fs pids."""
    return {e.pid for e in entries
            if isinstance(e, IdshiftStep) and e.pid is not None and e.pid > 1}


def shifted(entries: Iterable[Entry]) -> bool:
    """Whether the attachment is fuse mode's shifted one (fuse2fs at RUN_DIR/mnt/VOL)."""
    return any(isinstance(e, IdshiftStep) for e in entries)


def idmap_of(entries: Iterable[Entry]) -> tuple[int, int, int] | None:
    """(uid_first, gid_first, count) of the journalled idmapped or id-shifted rootfs, or None."""
    for e in entries:
        if (isinstance(e, IdmapStep | IdshiftStep) and e.phase is Phase.START
                and e.uid_first is not None and e.gid_first is not None and e.count is not None):
            return e.uid_first, e.gid_first, e.count
    return None
