"""gatewayd: the trio service behind the admin socket."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import trio

from gateway import log as gwlog
from gateway.catalog import Catalog
from gateway.config import Settings, parse_roots
from gateway.errors import first_gateway_error
from gateway.log import fields
from gateway.server import AccessPolicy, AdminServer
from gateway.service import Gateway

log = logging.getLogger("gateway.daemon")


def notify_systemd(message: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed", extra=fields(error=str(exc)))


async def serve(settings: Settings) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.run_dir, 0o755)
    catalog = Catalog(settings.catalog_path)
    gateway = Gateway(settings, catalog)
    policy = AccessPolicy(settings.admin_group)
    try:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await nursery.start(AdminServer(settings.admin_socket, gateway.handle, policy).run)
                log.info("gatewayd ready", extra=fields(socket=str(settings.admin_socket),
                                                        catalog=str(settings.catalog_path)))
                notify_systemd("READY=1")
                async for signum in signals:
                    log.info("shutting down", extra=fields(signal=signal.Signals(signum).name))
                    notify_systemd("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        catalog.close()
    log.info("gatewayd stopped")


def parse_args(argv: list[str] | None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="gatewayd", description="storage-gateway daemon")
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir,
                        help="holds the SQLite catalog (env GATEWAY_STATE_DIR)")
    parser.add_argument("--run-dir", type=Path, default=defaults.run_dir,
                        help="holds admin.sock and runtime state (env GATEWAY_RUN_DIR)")
    parser.add_argument("--admin-group", default=defaults.admin_group,
                        help="group whose members may use the admin socket besides root")
    parser.add_argument("--allowed-roots", default=None,
                        help="colon-separated directories images must live in "
                             "(env GATEWAY_ALLOWED_ROOTS)")
    parser.add_argument("--log-level", default=defaults.log_level,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                                 "error"])
    ns = parser.parse_args(argv)
    roots = (parse_roots(ns.allowed_roots) if ns.allowed_roots is not None
             else defaults.allowed_roots)
    return Settings(state_dir=ns.state_dir.absolute(), run_dir=ns.run_dir.absolute(),
                    admin_group=ns.admin_group, allowed_roots=roots, log_level=ns.log_level)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    gwlog.setup(settings.log_level)
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = first_gateway_error(exc)
        if error is None:
            raise
        log.error("gatewayd failed", extra=fields(error=error.message, code=error.code))
        print(f"gatewayd: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
