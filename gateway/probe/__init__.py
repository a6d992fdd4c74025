"""The rootfs probe: partition tables and superblocks through the sans-I/O C core.

Modules: core (the drivers over the native core and the rootfs rule), image (offline probe of an
image file through a transient export), _native (the C core, built with cffi).
"""

__all__ = ["core", "image"]
