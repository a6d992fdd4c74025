"""Pure cores of RBD volumes: image specs, the facts pinned in an image's metadata, the QSD node
of an RBD volume, and the per-cluster health record (no cluster)."""

from __future__ import annotations

import pytest

from gateway.ceph.client import Health
from gateway.ceph.location import RbdImage, is_rbd_path, parse_spec
from gateway.ceph.meta import FORMAT_KEY, FSTYPE_KEY, ORIGIN_KEY, settle
from gateway.errors import ClusterError, FormatError, InvalidArgument, NotFound
from gateway.nbd.nodes import ExportSpec, layer_commands

pytestmark = pytest.mark.timeout(10)


def test_spec_with_and_without_namespace() -> None:
    image = parse_spec("pool/img", conf="/etc/ceph/ceph.conf")
    assert (image.pool, image.namespace, image.image, image.user) == ("pool", "", "img", "admin")
    assert image.spec == "pool/img" and image.path == "rbd:pool//img"
    image = parse_spec("pool/ns/img", user="gw")
    assert image.spec == "pool/ns/img" and image.path == "rbd:pool/ns/img"
    assert image.user == "gw" and image.conf is None
    assert is_rbd_path(image.path) and not is_rbd_path("/srv/img.raw")


@pytest.mark.parametrize("spec", ["img", "a/b/c/d", "pool/", "/img", "pool/im g",
                                  "pool/img@snap", "pool/-x", "pool/ns/img,conf=/x"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="RBD"):
        parse_spec(spec)


def test_bad_conf_and_user_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_spec("p/i", conf="ceph.conf")
    with pytest.raises(InvalidArgument, match="client"):
        parse_spec("p/i", user="client.admin")
    with pytest.raises(InvalidArgument, match="ceph user"):
        parse_spec("p/i", user="a:b")


def test_declared_raw_is_written_to_an_unpinned_image() -> None:
    settled = settle({}, "p/i", declared_format="raw", declared_fstype="ext4")
    assert settled.format == "raw" and settled.fstype == "ext4"
    assert settled.writes == {FORMAT_KEY: "raw", FSTYPE_KEY: "ext4", ORIGIN_KEY: "registered"}


def test_pinned_image_needs_no_declaration_and_writes_nothing() -> None:
    pinned = {FORMAT_KEY: "raw", FSTYPE_KEY: "ext4", ORIGIN_KEY: "registered"}
    settled = settle(pinned, "p/i", declared_format=None)
    assert (settled.format, settled.fstype, settled.writes) == ("raw", "ext4", {})
    assert settle(pinned, "p/i", declared_format="raw").writes == {}


def test_unpinned_image_without_declaration_is_refused() -> None:
    with pytest.raises(FormatError, match="--format raw"):
        settle({}, "p/i", declared_format=None)


def test_qcow2_is_refused_declared_or_pinned() -> None:
    with pytest.raises(FormatError, match="qcow2 on RBD is not supported"):
        settle({}, "p/i", declared_format="qcow2")
    with pytest.raises(FormatError, match="qcow2 on RBD is not supported"):
        settle({FORMAT_KEY: "qcow2"}, "p/i", declared_format=None)
    with pytest.raises(FormatError, match="unknown"):
        settle({FORMAT_KEY: "vmdk"}, "p/i", declared_format=None)


def test_contradictions_are_refused() -> None:
    with pytest.raises(FormatError, match="contradicts"):
        settle({FORMAT_KEY: "raw", FSTYPE_KEY: "xfs"}, "p/i", declared_format=None,
               declared_fstype="ext4")


def test_rbd_node_is_explicit_and_unprobed() -> None:
    image = RbdImage(pool="pool", namespace="ns", image="img", conf="/c/ceph.conf", user="gw")
    spec = ExportSpec(name="web", path=image.path, fmt="raw", read_only=False, rbd=image)
    (_, proto), (_, fmt) = layer_commands(spec)
    assert proto["driver"] == "rbd"
    assert {k: proto[k] for k in ("pool", "namespace", "image", "user", "conf")} == {
        "pool": "pool", "namespace": "ns", "image": "img", "user": "gw", "conf": "/c/ceph.conf"}
    assert proto["cache"]["direct"] is True and proto["auto-read-only"] is False
    assert "filename" not in proto
    assert fmt["driver"] == "raw" and fmt["file"] == proto["node-name"]
    bare = RbdImage(pool="pool", namespace="", image="img")
    (_, proto), _ = layer_commands(ExportSpec(name="b", path=bare.path, fmt="raw",
                                              read_only=True, rbd=bare))
    assert "namespace" not in proto and "conf" not in proto and proto["read-only"] is True


def test_rbd_spec_must_be_raw_and_match_its_path() -> None:
    image = RbdImage(pool="pool", namespace="", image="img")
    with pytest.raises(InvalidArgument, match="plain raw"):
        ExportSpec(name="web", path=image.path, fmt="qcow2", read_only=False, rbd=image)
    with pytest.raises(InvalidArgument, match="not its RBD"):
        ExportSpec(name="web", path="/srv/x", fmt="raw", read_only=False, rbd=image)
    base = ExportSpec(name="base", path=image.path, fmt="raw", read_only=True, rbd=image)
    with pytest.raises(InvalidArgument, match="cannot back"):
        ExportSpec(name="top", path="/srv/top.qcow2", fmt="qcow2", read_only=False, backing=base)


def test_cluster_health_counts_any_answer_as_reachable() -> None:
    health = Health()
    image = RbdImage(pool="p", namespace="", image="i", conf="/c/ceph.conf")
    health.note(image, ClusterError("p/i: ceph cluster not reachable within 3s"))
    entry = health.report()["/c/ceph.conf"]
    assert entry["reachable"] is False and entry["last_ok"] is None
    assert "not reachable" in entry["last_error"]["message"]
    health.note(image, NotFound("p/i: no such image"))  # the cluster answered
    entry = health.report()["/c/ceph.conf"]
    assert entry["reachable"] is True and entry["last_ok"] is not None
    health.note(RbdImage(pool="p", namespace="", image="j"), None)
    assert health.report()["default"]["reachable"] is True
