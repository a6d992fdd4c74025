"""Finding the gateway's own helper processes (fuse2fs, the id-shifting layer) in /proc, and the
path checks their handles share: a process is trusted only if root runs the expected program,
and a handle acts only on targets below the directory that confines it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def norm(path: str | os.PathLike[str]) -> str:
    """`path` absolute and normalized (no symlinks resolved)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def within(path: str, root: str, *, inclusive: bool = False) -> bool:
    """Whether normalized `path` lies below normalized `root` (or is it, if `inclusive`)."""
    return (inclusive and path == root) or path.startswith(root.rstrip("/") + "/")


def root_owned(pid: int) -> bool:
    """Real and effective uid 0, from /proc/PID/status (False once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    uids = line.split()[1:3]
                    return len(uids) == 2 and all(u == b"0" for u in uids)
    except OSError:
        pass
    return False


def scan(identify: Callable[[int], T | None]) -> list[T]:
    """Every process on the host that `identify` recognises."""
    found: list[T] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = identify(int(entry))
            if proc is not None:
                found.append(proc)
    return found
