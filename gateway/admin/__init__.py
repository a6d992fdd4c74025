"""The admin surface: the JSON-lines protocol (sans I/O), the Unix-socket server and its
access policy, the blocking client, and the ops it serves.

Modules: protocol (wire format and connection state machines), server (trio adapter, peer
checks, limits), client (blocking client for gatewayctl, the hook and scripts), ops (the op
table and the dispatcher), args (every op's argument keys and types), gateway (the Gateway the
ops act on), jobs (the job table), volume_ops (volumes, exports, mounts, status, metrics),
lifecycle_ops (volume creation, import, resize, pool volumes and jobs), domain_ops (libvirt-lxc
domains).
"""

__all__ = ["args", "client", "domain_ops", "gateway", "jobs", "lifecycle_ops", "ops", "protocol",
           "server", "volume_ops"]
