"""User-namespace domains: id slices (`slices`, a pure core) and the ranges they come from
(`ranges`: --userns-range, /etc/subuid and /etc/subgid, the ids the host already uses)."""

__all__ = ["ranges", "slices"]
