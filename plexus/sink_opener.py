"""Opening a sink, and what happens when it cannot open.

A sink's ``open()`` runs once when the pipeline starts, in the starting
thread, so the common case (it opens) is as before. When it raises (a file
sink's folder cannot be created, a plugin's device is absent) the sink is
isolated rather than taking the gateway down:

- the failure is logged with when the next attempt is, and shown in the
  sink's status (``state: opening``, ``last_error``);
- ``open()`` is tried again in a background thread, after 1 s, 2 s, 4 s ...
  up to 60 s (each +-25%), until it succeeds or the pipeline closes;
- meanwhile its buffer keeps the sink's points (a full one drops its oldest,
  counted, without ever making a source wait), and every other sink keeps
  delivering; once open, its uploader starts and sends what waited.

``close()`` is called at shutdown only for a sink whose ``open()`` returned.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from plexus.adapters.base import describe_error
from plexus.ratelimit import RateLimitedLog
from plexus.sinks.base import Sink

__all__ = ["SinkOpener"]

log = logging.getLogger("plexus.sinks")


class SinkOpener:
    """Open ``sink`` for ``source_id``; call ``on_open`` once it is open.

    Parameters:
        sink: the sink to open.
        source_id: passed to ``sink.open``.
        on_open: called once, from the thread that opened the sink (the
            caller of :meth:`start`, or the retry thread).
        initial, maximum: the first and the longest pause between attempts,
            in seconds (each +-25%).
    """

    def __init__(self, sink: Sink, source_id: str, on_open: Callable[[], None], *,
                 initial: float = 1.0, maximum: float = 60.0) -> None:
        self.sink = sink
        self.source_id = source_id
        self.initial = initial
        self.maximum = maximum
        self.state = "closed"  # "open" | "opening" (retrying) | "stopped"
        self.attempts = 0
        self.last_error: str | None = None
        #: time.time() of the next attempt while retrying
        self.next_attempt_at: float | None = None
        self._on_open = on_open
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_log = RateLimitedLog(log, interval=60.0)

    @property
    def opened(self) -> bool:
        return self.state == "open"

    def start(self) -> bool:
        """Try once now; on failure keep trying in the background. True when open now."""
        if self._attempt():
            return True
        self._thread = threading.Thread(target=self._retry, daemon=True,
                                        name=f"plexus-sink-open:{self.sink.name}")
        self._thread.start()
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop retrying (an attempt under way is waited for, up to ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state != "open":
            self.state = "stopped"
            self.next_attempt_at = None

    def _attempt(self) -> bool:
        self.attempts += 1
        try:
            self.sink.open(self.source_id)
        except Exception as exc:  # a plugin's open() may raise anything
            self.last_error = describe_error(exc)
            return False
        if self._stop.is_set():
            # Opened while the pipeline closed: nothing will send, so let go at once.
            self._close_quietly()
            return False
        self.state = "open"
        self.next_attempt_at = None
        if self.attempts > 1:
            log.info("sink %s is open (attempt %d); sending what was buffered meanwhile",
                     self.sink.name, self.attempts)
        self.last_error = None
        self._on_open()
        return True

    def _retry(self) -> None:
        delay = self.initial
        self.state = "opening"
        while not self._stop.is_set():
            pause = min(delay, self.maximum) * random.uniform(0.75, 1.25)
            self.next_attempt_at = time.time() + pause
            if self.attempts == 1:
                log.error("sink %s could not open: %s; the other sinks keep delivering, its "
                          "points are buffered, next attempt in %.1f s", self.sink.name,
                          self.last_error, pause)
            else:
                self._retry_log(logging.WARNING, "sink %s still cannot open after %d attempts: "
                                "%s; next attempt in %.1f s", self.sink.name, self.attempts,
                                self.last_error, pause)
            if self._stop.wait(pause):
                return
            if self._attempt():
                return
            delay = min(delay * 2, self.maximum)

    def _close_quietly(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:
            log.debug("sink %s: close failed: %s", self.sink.name, exc)
