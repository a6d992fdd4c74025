"""Soak tests: long runs under `make soak` only (tests/conftest.py leaves this directory out
otherwise)."""
