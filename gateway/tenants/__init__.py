"""Tenants: members of gatewayd's tenant group, who may use the admin socket for their own
volumes only. `rights` is the pure table that decides what a caller may ask for; `ids` finds a
tenant's own /etc/subuid and /etc/subgid ranges; `socket` opens the admin socket to the group."""
