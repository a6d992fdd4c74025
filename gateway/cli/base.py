"""What every gatewayctl command module uses: the argument parser class, the admin call, output
helpers and shared options. It imports no other cli module (they all import it), and stays light:
the admin client loads only when a command calls gatewayd.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Unbuilt(Parser):
    """The parser of a command this run does not execute: it keeps its name and help (for
    --help and choice errors) and ignores its argument definitions, which are most of
    gatewayctl's start-up work. Should argparse pick it after all, it raises Chosen and the
    caller parses again with every command built."""

    class Chosen(Exception):
        pass

    def __init__(self, **kwargs: Any) -> None:
        """Deliberately no ArgumentParser.__init__: that work (with gettext lookups of its
        titles) is what an unbuilt parser saves, and nothing reads its state."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return self

    def set_defaults(self, **kwargs: Any) -> None:
        return None

    def add_subparsers(self, **kwargs: Any) -> Any:  # type: ignore[override]
        return self

    def add_parser(self, name: str, **kwargs: Any) -> Unbuilt:
        return self

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        raise Unbuilt.Chosen


class Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands of which only `only` (when set) gets its parser built in full; the others
    get Unbuilt parsers. Made by add_commands."""

    only: str | None = None

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.only is None or name == self.only:
            return super().add_parser(name, **kwargs)
        full, self._parser_class = self._parser_class, Unbuilt
        try:
            return super().add_parser(name, **kwargs)
        finally:
            self._parser_class = full


def add_commands(parser: Parser, only: str | None, **kwargs: Any) -> Commands:
    """parser.add_subparsers(**kwargs) whose parsers are Parser, all built in full or, with
    `only`, only that command's."""
    commands = parser.add_subparsers(action=Commands, parser_class=Parser, **kwargs)
    assert isinstance(commands, Commands)
    commands.only = only
    return commands


def command_word(argv: Sequence[str], valued: Sequence[str]) -> str | None:
    """The word argparse will take as the command: the first one that is neither an option nor
    the value of one of the `valued` top-level options (given whole or as an unambiguous
    prefix, as argparse allows). None when unsure."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if not word.startswith("-"):
            return word
        takes_value = "=" not in word and len(word) > 2 and any(
            o.startswith(word) for o in valued)
        i += 2 if takes_value else 1
    return None


def call(ns: argparse.Namespace, op: str, args: dict[str, Any] | None = None) -> Any:
    from gateway.admin import client
    return client.call(ns.socket, op, args or {}, timeout=ns.timeout,
                       wait=getattr(ns, "wait", None))


def absolute(path: str) -> str:
    """A path argument as gatewayd needs it on the wire: a relative one is taken against
    gatewayctl's working directory (not normalised: `..` after a symlink is gatewayd's to
    resolve)."""
    if os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except FileNotFoundError:
        from gateway.errors import InvalidArgument
        raise InvalidArgument(f"cannot resolve {path}: the working directory no longer "
                              "exists; give an absolute path") from None


def emit(ns: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> int:
    if getattr(ns, "json", False):
        print(json.dumps(value, indent=2))
    else:
        text = human(value)
        if text:
            print(text)
    return 0


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def mapping(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {'-' if v is None else v}" for k, v in pairs)


def add_mount_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setuid", action="store_true",
                   help="honour setuid binaries in the rootfs (default: mounted nosuid)")
    p.add_argument("--nosuid", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--noexec", action="store_true", help="mount the rootfs noexec")


def mount_flag_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The mount-flag arguments of a request that makes a volume (nosuid is the default)."""
    return {"setuid": ns.setuid, "noexec": ns.noexec}
