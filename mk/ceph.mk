# RBD volumes against local files (bench/rbd.py): a throw-away Ceph cluster and two gatewayd
# hosts; mount latency cold/warm, fio through the block view, takeover time after kill -9 of a
# host. Table in bench/results/rbd-latest.md.
.PHONY: bench-rbd
bench-rbd: setup
	$(PY) -m bench.rbd --out bench/results $(RBD_BENCH_ARGS)
