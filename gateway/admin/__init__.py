"""The admin surface: the JSON-lines protocol (sans I/O), the Unix-socket server and its
access policy, the blocking client, and the ops it serves.

Modules: protocol (wire format and connection state machines), server (trio adapter, peer
checks, limits), client (blocking client for gatewayctl, the hook and scripts), service (the
volume, export and mount ops), lifecycle_ops (volume creation, import, resize and jobs).
"""

__all__ = ["client", "lifecycle_ops", "protocol", "server", "service"]
