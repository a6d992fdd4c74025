# Mount-latency benchmark (bench/mount_latency.py): JSON, PNG and markdown table in bench/results/.
BENCH_ARGS ?=

bench: setup
	$(PY) -m bench.mount_latency $(BENCH_ARGS)

bench-smoke: setup
	$(PY) -m bench.mount_latency --smoke --out $${TMPDIR:-/tmp}/storage-gateway-bench-smoke

# Snapshot benchmark (bench/snapshot.py): a 1 GiB volume snapshotted while a libvirt-lxc container
# writes to it; the container's largest write stall and the copy's speed against qemu-img convert.
.PHONY: bench-snapshot
bench-snapshot: setup
	$(PY) -m bench.snapshot $(SNAPSHOT_BENCH_ARGS)
