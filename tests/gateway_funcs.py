"""Functions the gateway tests poll through the ``callable`` adapter."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

_counter = itertools.count()


def sequence() -> dict[str, int]:
    """Each call returns the next integer, so gaps in what arrives show loss."""
    return {"test.seq": next(_counter)}


def fast_sequence(step: float = 0.001) -> Iterator[tuple[str, int]]:
    """A generator: yields 0, 1, 2... as (metric, value) as fast as ``step`` allows."""
    for n in itertools.count():
        yield [("test.fast", n)]  # type: ignore[misc]
        time.sleep(step)


def number() -> float:
    return 21.5


def pairs() -> list[tuple[str, float]]:
    return [("test.a", 1.0), ("test.b", 2.0)]


def broken() -> float:
    raise RuntimeError("sensor on fire")


def sometimes_broken() -> dict[str, int]:
    n = next(_counter)
    if n % 2:
        raise RuntimeError(f"odd call {n}")
    return {"test.even": n}


def leaky() -> float:
    """Careless user code: logs the API key it found in the environment."""
    import logging
    import os

    logging.getLogger("user.code").warning("calling home with key %s",
                                           os.environ.get("PLEXUS_API_KEY"))
    return 1.0
