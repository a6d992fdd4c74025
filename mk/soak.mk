# Reliability and security (issue 8): fault-injection soak, 100-volume load, core fuzzing.
SOAK_CYCLES ?= 20
LOAD_VOLUMES ?= 100
FUZZ_CORES_EXAMPLES ?= 20000
SOAK_REPORT ?= soak-report.jsonl

.PHONY: soak soak-faults soak-load soak-rss soak-summary fuzz-cores reliability-test

# Every fault scenario SOAK_CYCLES times, then the load test with LOAD_VOLUMES volumes, then
# RSS_CYCLES mount/umount cycles of one volume with gatewayd's memory measured.
# One JSON line per cycle (recovery time, leaks, acked writes, fsck, fds) goes to SOAK_REPORT.
soak: soak-faults soak-load soak-rss soak-summary

# Recovery and write-stall p50/max and leaks per fault scenario, from SOAK_REPORT.
soak-summary: venv
	$(PY) -m tests.faults.summary $(abspath $(SOAK_REPORT))

soak-faults: native
	SOAK_CYCLES=$(SOAK_CYCLES) SOAK_REPORT=$(abspath $(SOAK_REPORT)) $(PY) -m pytest -q -s \
		-p no:cacheprovider tests/faults

soak-load: native
	LOAD_VOLUMES=$(LOAD_VOLUMES) SOAK_REPORT=$(abspath $(SOAK_REPORT)) $(PY) -m pytest -q -s \
		-p no:cacheprovider tests/test_load.py

# gatewayd's RSS over RSS_CYCLES bind mount/umount cycles of one volume stays within 2 MiB of
# where it was after the first 100 (tests/soak, collected only when named).
RSS_CYCLES ?= 2000

soak-rss: native
	RSS_CYCLES=$(RSS_CYCLES) SOAK_REPORT=$(abspath $(SOAK_REPORT)) $(PY) -m pytest -q -s \
		-p no:cacheprovider tests/soak

# The admin-protocol and QMP cores under many more hypothesis examples than `make test` runs.
fuzz-cores: venv
	FUZZ_CORES_EXAMPLES=$(FUZZ_CORES_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		--timeout=3600 tests/test_fuzz_cores.py

# The issue-8 tests in their bounded `make test` form.
reliability-test: native
	$(PY) -m pytest -q -p no:cacheprovider tests/faults tests/test_load.py tests/test_hostile.py \
		tests/test_fuzz_cores.py tests/test_metrics.py tests/test_systemd.py
