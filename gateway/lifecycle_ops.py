"""Admin ops for volume lifecycle (filled in by its owner)."""

from __future__ import annotations
