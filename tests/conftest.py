"""Shared fixtures."""

from __future__ import annotations

import pytest

from tests.support import CollectingContext


@pytest.fixture
def collector() -> CollectingContext:
    """An AdapterContext that validates points like the pipeline and keeps them."""
    return CollectingContext()
