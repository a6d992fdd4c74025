# Mount-latency benchmark (bench/mount_latency.py, with the fio and gatewayctl-overhead sections):
# JSON, PNG and markdown table in bench/results/.
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

# Data-plane throughput (bench/fio_table.py): fio on the block view's disk file against nbdfuse's
# on one QSD export, iodepth 1 and 32; also a section of `make bench`.
.PHONY: bench-fio bench-cli
bench-fio: setup
	$(PY) -m bench.fio_table --out bench/results $(FIO_BENCH_ARGS)

# gatewayctl's own overhead per command (bench/cli_overhead.py); also a section of `make bench`.
bench-cli: setup
	$(PY) -m bench.cli_overhead --out bench/results $(CLI_BENCH_ARGS)
