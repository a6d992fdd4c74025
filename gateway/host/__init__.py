"""Kernel and tool primitives with no gateway policy: mount(2) and mountinfo, loop devices,
fuse2fs, mkfs/e2fsck/sfdisk, qemu-img, and reopening image files without following symlinks.
Everything here blocks: call it from worker threads.
"""

__all__ = ["fuse2fs", "imagefile", "loopdev", "mkfs", "mounts", "qemu_img"]
