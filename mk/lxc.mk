# libvirt-lxc building blocks (gateway/lxc). Included by the top-level Makefile.
LXC_RUN_DIR ?= /run/storage-gateway
LXC_PY ?= .venv/bin/python

.PHONY: lxc-up lxc-down lxc-status lxc-hook-install lxc-test lxc-hook-latency

# Start a libvirtd for lxc:/// (reused if one answers) with RUN_DIR/rootfs as a shared mount.
# Install the hook first (lxc-hook-install): libvirtd only finds hooks present when it starts.
lxc-up:
	$(LXC_PY) -m gateway.lxc.libvirtd up --shared $(LXC_RUN_DIR)/rootfs

lxc-down:
	$(LXC_PY) -m gateway.lxc.libvirtd down

lxc-status:
	$(LXC_PY) -m gateway.lxc.libvirtd status

lxc-hook-install:
	$(LXC_PY) -c 'from gateway.lxc.hook import install_hook; print(install_hook())'

lxc-test:
	$(LXC_PY) -m pytest -q -ra tests/test_lxc_units.py tests/test_lxc_libvirt.py

lxc-hook-latency:
	$(LXC_PY) -m tests.test_lxc_units
