"""Kernel and tool primitives with no gateway policy: mount(2) and mountinfo, loop devices,
fuse2fs, mkfs/e2fsck/sfdisk, qemu-img, reopening image files without following symlinks,
idmapped mounts and user-namespace fds, search ACLs, finding the gateway's helper processes in
/proc (procs). Everything here blocks: call it from worker threads.
"""

__all__ = ["acl", "fuse2fs", "idmap", "imagefile", "loopdev", "mkfs", "mounts", "procs", "qemu_img"]
