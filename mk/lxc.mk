# libvirt-lxc building blocks (gateway/lxc). Included by the top-level Makefile.
LXC_RUN_DIR ?= /run/storage-gateway
LXC_PY ?= .venv/bin/python

.PHONY: lxc-up lxc-down lxc-status lxc-hook-install lxc-test lxc-hook-latency lxc-e2e stop

# Start a libvirtd for lxc:/// (reused if one answers) with RUN_DIR/rootfs as a shared mount.
# Install the hook first (lxc-hook-install): libvirtd only finds hooks present when it starts.
lxc-up:
	$(LXC_PY) -m gateway.libvirt.libvirtd up --shared $(LXC_RUN_DIR)/rootfs

lxc-down:
	$(LXC_PY) -m gateway.libvirt.libvirtd down

lxc-status:
	$(LXC_PY) -m gateway.libvirt.libvirtd status

lxc-hook-install:
	$(LXC_PY) -c 'from gateway.libvirt.hook import install_hook; print(install_hook())'

lxc-test:
	$(LXC_PY) -m pytest -q -ra tests/test_lxc_units.py tests/test_lxc_libvirt.py

# Issue 6 end to end (real gatewayd + libvirtd + containers); -s shows the hook latency figures.
lxc-e2e:
	$(LXC_PY) -m pytest -q -ra -s tests/test_e2e_lxc.py

# Undo `make run`: stop the demo container, its gatewayd and the libvirtd it started.
stop:
	$(LXC_PY) -m gateway.cli.demo stop

lxc-hook-latency:
	$(LXC_PY) -m tests.test_lxc_units
