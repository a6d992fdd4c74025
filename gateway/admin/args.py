"""Admin op arguments: every op declares its keys and their types here (SPECS).

`parse(op, args)` checks a request's args against its op's declaration before the handler runs:
a key the op does not declare is refused (invalid-argument, naming the key and the op), each
declared key is checked by its parser, and an absent one takes its default. Handlers read the
result through typed getters (`Args.text`, `Args.flag`, ...); asking for a key the op does not
declare, or for the wrong type, is a programming error (InternalError).

A key whose value the handler needs only in some cases (`size` of a blank volume) is declared
optional and read with the non-optional getter there: a missing value then fails with the same
message its parser gives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypedDict

from gateway.errors import InternalError, InvalidArgument, PermissionDenied
from gateway.tenants.rights import ROOT, Caller
from gateway.userns.slices import IdMap
from gateway.volumes import lifecycle, register

Parser = Callable[[str, object], object]  # (key, value) -> checked value, or raises


@dataclass(frozen=True)
class Key:
    parse: Parser
    default: object = None
    required: bool = False  # absent (or null) fails at once with the parser's own message
    null_is_default: bool = True  # an explicit null means "not given"


# ---- parsers (each keeps the message the ops gave before they were declared here) ------------

def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be true or false")
    return value


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{key} must be a non-empty string")
    return value


def _volume(key: str, value: object) -> str:
    return register.check_name(value)


def _source(key: str, value: object) -> str:
    return register.check_name(_text(key, value))


def _domain(key: str, value: object) -> str:
    from gateway.libvirt.domain import validate_name  # libvirt loads only when a domain op runs
    return validate_name(value)  # type: ignore[arg-type]


def _path(key: str, value: object) -> str:
    """An image or tarball path; resolved and checked later, in a worker thread (it walks the
    filesystem)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument("an image path is required")
    return value


def _output(key: str, value: object) -> str:
    """An output file path (`volume save`); checked and created later, in a worker thread."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument("an output file path is required")
    return value


def _format(key: str, value: object) -> str:
    return register.check_format(value)


def _rate(key: str, value: object) -> int:
    """Bytes per second: 4194304, "4194304", "4M" (binary units, no 1 MiB multiple needed)."""
    match = lifecycle.SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        rate = value
    elif match is not None:
        rate = int(match.group(1)) * lifecycle.UNITS[match.group(2).upper()]
    else:
        raise InvalidArgument(f"{key} must be bytes per second, e.g. 4194304 or 4M")
    if rate < 1:
        raise InvalidArgument(f"{key} must be at least 1 byte per second")
    return rate


def _pool_format(key: str, value: object) -> str:
    return register.check_format(_text(key, value))


def _fstype(key: str, value: object) -> str | None:
    return register.check_fstype(value)


def _size(key: str, value: object) -> int:
    return lifecycle.parse_size(value)


def _mode(key: str, value: object) -> str:
    """A mount mode (bind when empty); which modes exist is the rootfs manager's business."""
    mode = value or "bind"
    if not isinstance(mode, str):
        raise InvalidArgument("mode must be bind or fuse")
    return mode


def _init(key: str, value: object) -> str:
    init = value or "/sbin/init"
    if not isinstance(init, str):
        raise InvalidArgument("init must be a path")
    return init


def _count(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{key} must be a positive integer")
    return value


def _words(key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key} must be a list of strings")
    return list(value)


def _idmap(key: str, value: object) -> IdMap:
    """{uid_first, gid_first, count}: the map a domain names itself (the libvirt hook)."""
    if not isinstance(value, dict) or set(value) != {"uid_first", "gid_first", "count"} or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        raise InvalidArgument(f"{key} must be an object of integers uid_first, gid_first, count")
    return IdMap(value["uid_first"], value["gid_first"], value["count"])


def _job_id(key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise InvalidArgument(f"{key} must be a job id")
    return str(value)


def _refused_uri(key: str, value: object) -> None:
    raise PermissionDenied("a request cannot name a libvirt URI; gatewayd uses its own "
                           "(--libvirt-uri)")


# ---- declarations ------------------------------------------------------------------------------

FLAG = Key(_flag, default=False, null_is_default=False)
NAME = {"name": Key(_volume, required=True)}
# mount flags of a volume being made: nosuid unless `setuid` (`nosuid: true` changes nothing)
MADE = {"setuid": FLAG, "nosuid": FLAG, "noexec": FLAG}
DOMAIN = {"name": Key(_domain, required=True), "volume": Key(_volume, required=True),
          "mode": Key(_mode, default="bind"), "init": Key(_init, default="/sbin/init"),
          "args": Key(_words, default=[], null_is_default=False),
          "memory": Key(_count, default=128, null_is_default=False),
          "vcpus": Key(_count, default=1, null_is_default=False)}

SPECS: dict[str, dict[str, Key]] = {
    "status": {},
    "metrics": {},
    "shutdown": {"all": FLAG, "force": FLAG},
    "volume-list": {},
    "volume-add": {**NAME, **MADE, "fstype": Key(_fstype), "read_only": FLAG,
                   "format": Key(_format, required=True), "path": Key(_path, required=True)},
    # an RBD image: rbd is POOL[/NAMESPACE]/IMAGE; format only when the image has none pinned
    "volume-add-rbd": {**NAME, "rbd": Key(_text, required=True), "ceph_conf": Key(_text),
                       "ceph_user": Key(_text), "format": Key(_format), **MADE,
                       "fstype": Key(_fstype), "read_only": FLAG},
    "volume-add-pool": {**NAME, "uri": Key(_refused_uri, null_is_default=False),
                        "pool": Key(_text, required=True), "vol": Key(_text, required=True),
                        "format": Key(_pool_format), **MADE, "fstype": Key(_fstype),
                        "read_only": FLAG},
    # absent: unchanged
    "volume-set": {**NAME, "setuid": Key(_flag, null_is_default=False),
                   "noexec": Key(_flag, null_is_default=False)},
    "volume-show": NAME,
    "volume-release": NAME,
    "volume-remove": NAME,
    "export": NAME,
    "unexport": NAME,
    "probe": NAME,
    "mount": {**NAME, "mode": Key(_mode, default="bind"), "userns": FLAG,
              "idmap": Key(_idmap)},
    # if_unused and domain: the libvirt hook releasing a domain's volume
    "umount": {**NAME, "force": FLAG, "if_unused": FLAG, "domain": Key(_text)},
    "volume-create": {**NAME, "from": Key(_source), "overlay": FLAG, "copy": FLAG,
                      "format": Key(_format), "size": Key(_size), "mkfs": Key(_text),
                      "label": Key(_text), "partitioned": FLAG, "pool": Key(_text),
                      "ceph_conf": Key(_text), "ceph_user": Key(_text), **MADE},
    "volume-import": {**NAME, "tarball": Key(_path, required=True),
                      "size": Key(_size, required=True), "format": Key(_format, default="raw"),
                      "label": Key(_text), "partitioned": FLAG, **MADE},
    "volume-resize": {**NAME, "size": Key(_size, required=True)},
    # format: the snapshot's (default: the source's); rate_limit: bytes/s of the copy
    "volume-snapshot": {**NAME, "to": Key(_volume, required=True), "format": Key(_format),
                        "rate_limit": Key(_rate)},
    "volume-save": {**NAME, "file": Key(_output, required=True),
                    "format": Key(_format, required=True), "compress": FLAG, "force": FLAG,
                    "rate_limit": Key(_rate)},
    "job-status": {"id": Key(_job_id, required=True)},
    "job-cancel": {"id": Key(_job_id, required=True)},
    "job-list": {},
    "domain-xml": DOMAIN,
    "domain-start": {**DOMAIN, "release_host_view": FLAG, "userns": FLAG},
    "domain-stop": {"name": Key(_domain, required=True)},
    "domain-list": {},
    # tenancy (admin only): publish for tenants' overlays, withdraw, give to a user
    "volume-publish": NAME,
    "volume-unpublish": NAME,
    "volume-chown": {**NAME, "user": Key(_text, required=True)},
}


def _shown(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 66 else text[:60] + "...'"


class Args:
    """A request's args, checked against its op's declaration."""

    def __init__(self, op: str, spec: Mapping[str, Key], values: dict[str, object],
                 given: frozenset[str]) -> None:
        self.op = op
        self._spec = spec
        self._values = values
        self._given = given
        # who sent the request (set by the dispatcher once the rights table admitted it)
        self.caller: Caller = ROOT

    def given(self, key: str) -> bool:
        """Whether the request named `key` with a value (not null)."""
        self._declared(key)
        return key in self._given

    def _declared(self, key: str) -> Key:
        try:
            return self._spec[key]
        except KeyError:
            raise InternalError(f"op {self.op} reads argument {key!r}, which it does not "
                                "declare") from None

    def _get(self, key: str, kind: type | tuple[type, ...], what: str, *,
             needed: bool) -> object:
        decl = self._declared(key)
        value = self._values[key]
        if value is None and needed:
            decl.parse(key, None)  # raises the key's own message for a missing value
            raise InternalError(f"op {self.op}: argument {key} has no value")
        if value is not None and not isinstance(value, kind):
            raise InternalError(f"op {self.op}: argument {key} is declared as another type "
                                f"than {what}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key, str, "text", needed=True)
        assert isinstance(value, str)
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, str, "text", needed=False)
        assert value is None or isinstance(value, str)
        return value

    def number(self, key: str) -> int:
        value = self._get(key, int, "a number", needed=True)
        assert isinstance(value, int)
        return value

    def opt_number(self, key: str) -> int | None:
        value = self._get(key, int, "a number", needed=False)
        assert value is None or isinstance(value, int)
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key, bool, "a flag", needed=True)
        assert isinstance(value, bool)
        return value

    def opt_idmap(self, key: str) -> IdMap | None:
        value = self._get(key, IdMap, "an id map", needed=False)
        assert value is None or isinstance(value, IdMap)
        return value

    def opt_flag(self, key: str) -> bool | None:
        value = self._get(key, bool, "a flag", needed=False)
        assert value is None or isinstance(value, bool)
        return value

    def words(self, key: str) -> list[str]:
        value = self._get(key, list, "a list", needed=True)
        assert isinstance(value, list)
        return [str(v) for v in value]


def parse(op: str, args: Mapping[str, object]) -> Args:
    """Check `args` against `op`'s declaration (every key, in declaration order)."""
    spec = SPECS.get(op)
    if spec is None:
        raise InternalError(f"op {op} declares no arguments")
    for key in args:
        if key not in spec:
            takes = ", ".join(spec) if spec else "no arguments"
            raise InvalidArgument(f"op {op} does not take argument {_shown(key)} "
                                  f"(it takes {takes})")
    values: dict[str, object] = {}
    given: set[str] = set()
    for key, decl in spec.items():
        value = args.get(key)
        if key not in args or (value is None and decl.null_is_default):
            if decl.required:
                decl.parse(key, None)  # raises the key's own message
                raise InternalError(f"op {op}: required argument {key} accepts a missing value")
            values[key] = decl.default
            continue
        values[key] = decl.parse(key, value)
        given.add(key)
    return Args(op, spec, values, frozenset(given))


class MountFlags(TypedDict):
    nosuid: bool
    noexec: bool


def mount_flags(args: Args) -> MountFlags:
    """nosuid and noexec of a volume being made: setuid binaries in it are honoured only when the
    request says `setuid: true` (nosuid is the default, so `nosuid: true` changes nothing)."""
    setuid = args.flag("setuid")
    if setuid and args.flag("nosuid"):
        raise InvalidArgument("setuid and nosuid contradict each other")
    return {"nosuid": not setuid, "noexec": args.flag("noexec")}
