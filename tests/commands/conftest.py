"""Fixtures for the command tests: receivers of both generations and clients linked to them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plexus import Plexus
from tests.support import wait_until as wait_until  # re-exported for the tests here


@pytest.fixture
def rx(plexus_receiver_factory):
    """A hosted-generation receiver (declared commands)."""
    return plexus_receiver_factory()


@pytest.fixture
def oss_rx(plexus_receiver_factory):
    """An open-source-gateway receiver (legacy commands only)."""
    return plexus_receiver_factory(ws_generation="oss")


@pytest.fixture
def make_client() -> Iterator[Callable[..., Plexus]]:
    """Plexus clients pointed at a receiver's /ingest and /ws/device; closed at teardown."""
    made: list[Plexus] = []

    def make(receiver: Any, source_id: str = "pod-07", **kwargs: Any) -> Plexus:
        kwargs.setdefault("flush_interval", 0.05)
        px = Plexus(api_key=receiver.api_key, source_id=source_id, gateway_url=receiver.url,
                    ws_url=receiver.ws_url, **kwargs)
        made.append(px)
        return px

    yield make
    for px in made:
        px.close(timeout=1)


class Gate:
    """A handler that blocks until released, counting its calls."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, run: Any, **params: Any) -> Any:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        return {"released": True}
