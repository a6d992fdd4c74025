"""The fuse-mode id shift of user-namespace rootfs: a passthrough FUSE layer, in a process of its
own, over fuse2fs's private mount (`fs`, run by `__main__`), its pure id arithmetic (`shift`) and
its lifecycle as seen from gatewayd (`process`)."""

__all__ = ["FSNAME", "fs", "process", "shift"]

FSNAME = "storage-gateway-idshift"  # the layer's mount source in mountinfo
