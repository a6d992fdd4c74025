"""libvirt-lxc building blocks: host preparation, libvirtd harness, domains, events and the hook."""
