"""mkfs.ext4 / mkfs.xfs, sfdisk, e2fsck, resize2fs and xfs_growfs: thin wrappers with typed errors.

Blocking: call from a worker thread. Every program works on a file the gateway owns (an image
being built) or on the gateway's block view; nothing here mounts anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gateway import command
from gateway.errors import CommandError, InvalidArgument

FILESYSTEMS = ("ext4", "xfs")
LABEL = re.compile(r"[A-Za-z0-9._-]{1,12}")
MIB = 1 << 20
GPT_START = MIB  # the partition starts at 1 MiB
GPT_TAIL = MIB  # room kept at the end for the backup GPT (33 sectors; 1 MiB keeps alignment)
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


class MkfsError(CommandError):
    pass


def check_label(label: str | None) -> str | None:
    if label is not None and not LABEL.fullmatch(label):
        raise InvalidArgument(f"invalid label {label!r}: 1-12 characters from [A-Za-z0-9._-]")
    return label


def mkfs(path: Path, fs: str, *, label: str | None = None, tree: Path | None = None,
         timeout: float = 1800.0) -> None:
    """Make a filesystem filling the file `path`; ext4 may be filled from `tree` (-d)."""
    label = check_label(label)
    if fs == "ext4":
        argv: list[str | os.PathLike[str]] = ["mkfs.ext4", "-q", "-F"]
        if label:
            argv += ["-L", label]
        if tree is not None:
            argv += ["-d", tree]
    elif fs == "xfs":
        if tree is not None:
            raise InvalidArgument("only ext4 can be filled from a tree")
        argv = ["mkfs.xfs", "-q", "-f"]
        if label:
            argv += ["-L", label]
    else:
        raise InvalidArgument(f"unknown filesystem {fs!r}: choose ext4 or xfs")
    argv.append(path)
    command.run(argv, timeout=timeout, error=MkfsError)


def gpt_one_partition(disk: Path, part_size: int) -> None:
    """Write a GPT with one Linux partition at 1 MiB of `part_size` bytes."""
    script = (f"label: gpt\nstart={GPT_START // 512}, size={part_size // 512}, "
              f"type={LINUX_FS_GUID}, name=rootfs\n")
    command.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk],
                input=script.encode(), error=MkfsError)


def grow_last_partition(disk: Path) -> None:
    """Move the backup GPT to the (new) end of the disk and grow partition 1 over the space."""
    command.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--relocate",
                 "gpt-bak-std", disk], error=MkfsError)
    command.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "-N", "1", disk],
                input=b", +\n", error=MkfsError)


def preen_ext(target: Path, *, force: bool = False, repair: bool = False,
              timeout: float = 1800.0) -> int:
    """`e2fsck -p`: replays the journal and fixes what is safe to fix unattended; `force` checks
    a filesystem marked clean too; `repair` (-f -y) fixes everything, as a boot with
    fsck.repair=yes would. Returns e2fsck's exit code (0 clean, 1 or 2 corrected).
    It parses tenant bytes, so it runs without any capability (uid 0 still owns the file)."""
    mode = ["-f", "-y"] if repair else ["-p", *(["-f"] if force else [])]
    argv = [*command.WITHOUT_CAPABILITIES, "e2fsck", *mode, os.fspath(target)]
    result = command.run(argv, timeout=timeout, check=False, error=MkfsError)
    if result.returncode not in (0, 1, 2):  # 2: corrected, "reboot" (meaningless here)
        raise MkfsError(f"e2fsck found errors it cannot fix unattended on {target} (exit "
                        f"{result.returncode}); run e2fsck on the image by hand")
    return result.returncode


def resize_ext4(target: Path, timeout: float = 1800.0) -> None:
    """Offline ext4 grow: a forced check first (resize2fs insists), then resize to fill."""
    preen_ext(target, force=True, timeout=timeout)
    command.run([*command.WITHOUT_CAPABILITIES, "resize2fs", target], timeout=timeout,
                error=MkfsError)


def grow_xfs(mountpoint: Path) -> None:
    """xfs grows online only: `mountpoint` is a mounted xfs."""
    command.run(["xfs_growfs", mountpoint], error=MkfsError)
