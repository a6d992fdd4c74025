"""Benchmarks: run them as modules from the repository root (`python -m bench.mount_latency`,
`make bench`); `gateway` is importable from the installed package."""
