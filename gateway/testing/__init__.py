"""Helpers the tests, the benchmarks and the demo share: a real gatewayd driven through
gatewayctl, and builders of the disk images they boot and probe.
"""

__all__ = ["ceph", "daemon", "images", "probe_images"]
