"""Volumes: registration with a pinned format, header inspection, and making new volumes
(overlays, copies, blank filesystems, tarball imports).

Modules: register (name and path rules, allowed roots, `volume add` checks), inspect (header-only
qcow2/raw inspector), build (overlays, copies, blank and imported images), tarball (member
rules and extraction), import_worker (the unprivileged user-namespace worker of an import), rbd
(registering an RBD image, its pinned facts read from the image's metadata).
"""

__all__ = ["build", "import_worker", "inspect", "rbd", "register", "tarball"]
