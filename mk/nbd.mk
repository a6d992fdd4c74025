# NBD export engine (gateway/nbd): tests, lint, bench.
PY ?= .venv/bin/python
NBD_TESTS = tests/test_qmp_core.py tests/test_qsd.py tests/test_nbd_client.py tests/test_export_security.py

.PHONY: nbd-test nbd-lint nbd-bench
nbd-test:
	$(PY) -m pytest -q $(NBD_TESTS)

nbd-lint:
	.venv/bin/ruff check gateway/nbd $(NBD_TESTS) bench/nbd_export.py
	.venv/bin/mypy

nbd-bench:
	$(PY) -m bench.nbd_export
