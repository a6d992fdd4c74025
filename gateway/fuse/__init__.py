"""The block view: a pyfuse3 filesystem exposing each exported volume's disk and rootfs window.

Modules: blockview (the filesystem), backend (the BlockBackend contract and a file backend).
"""

__all__ = ["backend", "blockview"]
