# Native probe: longer fuzzing run (the test suite runs a bounded ~20 s one).
FUZZ_SECONDS ?= 600

fuzz: native
	PROBE_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_probe_native.py -k libfuzzer

probe-test: native
	$(PY) -m pytest -q tests/test_probe.py tests/test_probe_native.py

bench-probe: native
	$(PY) -m bench.probe
