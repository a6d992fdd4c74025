"""Ceph RBD volumes: where an image lives (`location`, pure), the facts pinned in its metadata
(`meta`, pure), and the adapter to librados/librbd (`client`: blocking calls for worker threads,
errors mapped into gateway.errors). librados and librbd load only when `client` is first used.
"""

from gateway.ceph.location import RbdImage, is_rbd_path, parse_spec

__all__ = ["RbdImage", "is_rbd_path", "parse_spec"]
