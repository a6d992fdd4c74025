# storage-gateway: one-command setup, run and test on a fresh Debian 12 host (run as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
APT_PACKAGES := qemu-utils qemu-system-common libnbd-bin python3-libnbd nbdkit fuse3 \
	libfuse3-dev fuse2fs libvirt-daemon libvirt-daemon-driver-lxc libvirt-clients libvirt-dev \
	libparted-dev pkg-config busybox-static e2fsprogs xfsprogs btrfs-progs dosfstools fdisk gdisk \
	squashfs-tools cryptsetup-bin lvm2 util-linux zstd python3-venv python3-dev gcc clang \
	libclang-rt-14-dev procps fio ceph-mon ceph-osd ceph-common python3-rbd python3-rados \
	qemu-block-extra
PYTEST_ARGS ?=

.PHONY: setup apt venv native run test test-fast lint typecheck pytest clean bench fuzz soak

setup: apt venv native

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The editable install in setuptools' compat mode (a path in a .pth file): the default mode's
# import finder costs every Python start, and with it every gatewayctl call, about 10 ms here.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' \
		--config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

native: venv
	$(PY) build_native.py

run: setup
	$(PY) -m gateway.cli.demo

lint: setup
	$(VENV)/bin/ruff check gateway tests bench build_native.py

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test: setup lint typecheck pytest

# The fast tier: pure cores and in-process tests, no gatewayd or libvirtd process (under a minute).
test-fast: setup
	$(PY) -m pytest -q -ra -p no:cacheprovider -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf build gateway/probe/_native/*.so gateway/probe/_native/_probe.c .pytest_cache .mypy_cache

-include mk/*.mk
