"""gatewayctl and the other command-line front ends (the demo, the systemd unit writer).

Modules: main (gatewayctl), base (the parser class, the admin call and output helpers every
command module shares), lifecycle (volume create/import/resize and jobs), systemd
(install-systemd), demo (`make run`). They keep their imports light: gatewayctl must start fast.
"""

__all__ = ["base", "demo", "lifecycle", "main", "systemd"]
