"""libvirt-lxc: host preparation, the libvirtd harness, domains, lifecycle events and their
watcher, the lxc hook, storage pools. (The admin ops for domains are gateway.admin.domain_ops.)

Modules: connection, domain, events, hook, hostprep, hostview, libvirtd, pools, watcher (tears a
stopped domain's mount down).
"""

__all__ = ["connection", "domain", "events", "hook", "hostprep", "hostview", "libvirtd", "pools",
           "watcher"]
