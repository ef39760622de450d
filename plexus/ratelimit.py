"""A log that cannot be flooded: the adapters and the persistent buffer share it."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log at most one line per ``interval`` seconds, counting what it skipped.

    Garbage on a bus can arrive thousands of times a second; the log must stay
    readable and cheap.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._skipped = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} similar messages suppressed)"
            self._skipped = 0
        self._next = now + self._interval
        self._logger.log(level, message, *args)
