"""pytest fixtures around :class:`plexus.testing.Receiver`.

Fixtures:

``plexus_receiver``
    A started receiver that accepts the key ``plx_test``; stopped after the
    test. Point a client at ``plexus_receiver.url``.

``plexus_receiver_factory``
    Call it with :class:`~plexus.testing.Receiver` keyword arguments to get
    more (started) receivers; all are stopped at teardown::

        def test_splits_on_413(plexus_receiver_factory):
            rx = plexus_receiver_factory(max_body_bytes=64 * 1024)

The plugin is loaded through the ``pytest11`` entry point (or
``pytest_plugins = ["plexus.pytest_plugin"]`` in a conftest). plexus.testing
is imported inside the fixtures so that merely loading the plugin costs every
pytest run nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from plexus.testing import Receiver

__all__ = ["plexus_receiver", "plexus_receiver_factory"]


@pytest.fixture
def plexus_receiver() -> Iterator[Receiver]:
    """A started Plexus-compatible receiver accepting the key ``plx_test``."""
    from plexus.testing import Receiver

    with Receiver(api_keys=("plx_test",)) as receiver:
        yield receiver


@pytest.fixture
def plexus_receiver_factory() -> Iterator[Callable[..., Receiver]]:
    """Make started receivers from Receiver keyword arguments; all stopped at teardown."""
    from plexus.testing import Receiver

    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        made.append(receiver)  # before start(), so a half-started one is stopped too
        return receiver.start()

    yield make
    for receiver in made:
        receiver.stop()
