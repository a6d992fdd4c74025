"""A real Ceph cluster for tests: session fixtures `ceph_cluster` and `rbd_disk`.

One monitor and one memstore OSD on 127.0.0.1 under the session's temp dir
(gateway/testing/ceph.py), started once and stopped when the session ends. Skips, saying why, on
a host without the Ceph daemons (`make setup` installs them). `rbd_disk` is a small GPT disk
image with a busybox ext4 rootfs (carrying /etc/marker), to `rbd import`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing import ceph
from gateway.testing.ceph import Cluster
from gateway.testing.images import build_rootfs_tree, make_disk, make_fs_image

NEEDED = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no Ceph on this host ({', '.join(missing)} missing: run make setup)")
    with ceph.running(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
    assert cluster.processes() == [], "ceph daemons left running"


@pytest.fixture(scope="session")
def rbd_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rbd-images")
    fs = make_fs_image(root / "rootfs.ext4", 32 << 20, build_rootfs_tree(root / "tree"))
    return make_disk(root / "disk.raw", fs, "gpt")
