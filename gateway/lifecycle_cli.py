"""Command group placeholder (filled in by its owner)."""

from __future__ import annotations

from typing import Any


def register(top: Any, groups: dict[str, Any]) -> None:
    return None
