"""Shared fixtures."""

from __future__ import annotations

import pytest

from tests.support import CollectingContext

pytest_plugins = ["plexus.pytest_plugin"]


@pytest.fixture
def collector() -> CollectingContext:
    """An AdapterContext that validates points like the pipeline and keeps them."""
    return CollectingContext()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME and no PLEXUS_* settings from the environment."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in ("PLEXUS_API_KEY", "PLEXUS_SOURCE_ID", "PLEXUS_GATEWAY_URL", "PLEXUS_CONFIG",
                 "PLEXUS_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return home
