# Mount-latency benchmark (bench/mount_latency.py): JSON, PNG and markdown table in bench/results/.
BENCH_ARGS ?=

bench: setup
	$(PY) bench/mount_latency.py $(BENCH_ARGS)

bench-smoke: setup
	$(PY) bench/mount_latency.py --smoke --out $${TMPDIR:-/tmp}/storage-gateway-bench-smoke
