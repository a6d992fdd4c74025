"""`python -m gateway.idshift SOURCE TARGET --uid-first U --gid-first G [--count N] [-o OPTS]`:
serve SOURCE at TARGET with owners shifted (gateway.idshift.fs) until TARGET is unmounted or a
SIGTERM/SIGINT arrives (then it unmounts itself). OPTS: ro, noexec, suid (default nosuid);
nodev, allow_other and default_permissions always. Started by gateway.idshift.process."""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys

import pyfuse3
import trio

from gateway.idshift import FSNAME
from gateway.idshift.fs import ShiftFs
from gateway.idshift.shift import Shift

ALLOWED = ("ro", "noexec", "suid")


def mount_options(extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options) | {"allow_other", "nodev", f"fsname={FSNAME}",
                                           "subtype=idshift"}
    opts |= set(extra)
    if "suid" not in extra:
        opts.add("nosuid")
    return opts


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _sig in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.idshift")
    ap.add_argument("source")
    ap.add_argument("target")
    ap.add_argument("--uid-first", type=int, required=True)
    ap.add_argument("--gid-first", type=int, required=True)
    ap.add_argument("--count", type=int, default=65536)
    ap.add_argument("-o", dest="options", default="")
    args = ap.parse_args(argv)
    extra = [o for o in args.options.split(",") if o]
    bad = [o for o in extra if o not in ALLOWED]
    if bad:
        ap.error(f"unknown option(s) {','.join(bad)} (allowed: {', '.join(ALLOWED)})")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s idshift %(levelname)s %(message)s")
    # one O_PATH fd per inode the kernel remembers
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        shift = Shift(args.uid_first, args.gid_first, args.count)
        ops = ShiftFs(args.source, shift)
        pyfuse3.init(ops, args.target, mount_options(extra))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"idshift: {exc}", file=sys.stderr)
        return 1
    unmount = True
    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            pyfuse3.close(unmount=unmount)
        except Exception as exc:  # already unmounted from outside
            print(f"idshift: close: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
