"""Zoo fixtures: each shipped entry loaded once per session."""

from __future__ import annotations

import pytest

from mechdelta import zoo


@pytest.fixture(scope="session")
def entries():
    """Shipped entries by name, loaded lazily and cached for the session."""
    cache: dict[str, zoo.ZooEntry] = {}

    def get(name: str) -> zoo.ZooEntry:
        if name not in cache:
            cache[name] = zoo.load(name)
        return cache[name]

    return get
