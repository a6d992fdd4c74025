"""libvirt-lxc: host preparation, the libvirtd harness, domains, lifecycle events, the lxc hook,
storage pools, and the gateway ops for domains.

Modules: connection, domain, domains (admin ops and the lifecycle watcher), events, hook,
hostprep, hostview, libvirtd, pools.
"""

__all__ = ["connection", "domain", "domains", "events", "hook", "hostprep", "hostview",
           "libvirtd", "pools"]
