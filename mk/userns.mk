# User-namespace benchmark (bench/userns.py): mount and container start with and without
# --userns in bind and fuse mode, and fuse mode's id-shifting layer against plain fuse mode on
# metadata-heavy and streaming work, side by side; results in bench/results/userns-latest.*
.PHONY: bench-userns
bench-userns: setup
	$(PY) -m bench.userns $(USERNS_BENCH_ARGS)
