from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images import ImageSet, build_image_set


@pytest.fixture(scope="session")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageSet]:
    """The standard busybox images, built once per test session (read-only: copy before writing)."""
    yield build_image_set(tmp_path_factory.mktemp("images"))
