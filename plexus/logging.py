"""A logging bridge: log records at or above a level, sent to the platform as events.

    import logging
    from plexus import Plexus
    from plexus.logging import PlexusHandler

    px = Plexus()
    logging.getLogger().addHandler(PlexusHandler(px, level=logging.WARNING))

Each record becomes an event named ``log`` (see ``Plexus.event``): its data is
``{"level", "logger", "message"}`` (plus ``"exception": "Type: message"``
when the record has one, and ``"suppressed": n`` when the rate limit held
records back since the last event), at most 4 KB of JSON, the message cut to
fit; its tags are ``level`` and ``logger``. ``plexus-gateway`` does the same
for the rig's ``log_events: warning``.

Rules:

- **Rate-limited**: at most ``per_minute`` events a minute, in bursts of up
  to twice that; what is held back is counted, and the count rides on the
  next event that goes.
- **Never the API key**: the key the handler knows (the client's) and
  anything shaped like a Plexus key (``plx_...``) is replaced by
  ``plx_***`` in every field.
- **Never in the caller's way**: ``emit`` only puts the record on a small
  queue; a thread of the handler's own sends it. So a record logged by an
  uploader thread never waits for room in the buffer that thread empties,
  and records logged while an event is being sent are not sent again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from plexus.point import MAX_JSON_VALUE_BYTES, go_json_size

__all__ = ["PlexusHandler"]

EVENT_NAME = "log"
#: Records queued while the sending thread catches up; beyond, the oldest go.
MAX_QUEUED = 1000
_KEY_SHAPE = re.compile(r"plx_[A-Za-z0-9_\-]{4,}")
_REDACTED = "plx_***"

Sender = Callable[[str, Any, dict[str, str]], Any]


class PlexusHandler(logging.Handler):
    """Send log records at or above ``level`` as events.

    Parameters:
        target: a :class:`~plexus.Plexus` client, a pipeline (anything with
            ``emit(metric, value, timestamp, tags)``), or a callable
            ``send(name, data, tags)``.
        level: the lowest level sent (a number or a name like ``"warning"``).
        per_minute: most events a minute (bursts up to twice that).
        secret: a key to keep out of events besides ``plx_...`` shapes;
            taken from a Plexus client by default.
        clock: monotonic seconds, for the rate limit (injectable for tests).
    """

    def __init__(self, target: Any, level: int | str = logging.WARNING, *,
                 per_minute: float = 10.0, secret: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(_level(level))
        if per_minute <= 0:
            raise ValueError(f"per_minute must be positive, got {per_minute!r}")
        self._send = _sender(target)
        key = secret if secret is not None else getattr(getattr(target, "_api_key", None),
                                                       "reveal", lambda: None)()
        self._secret: str | None = key or None
        self.per_minute = float(per_minute)
        self._clock = clock
        self._tokens = 2 * self.per_minute
        self._refilled = clock()
        self.sent = 0
        self.suppressed = 0  # held back by the rate limit, ever
        self.failed = 0  # could not be sent (the target refused or was closed)
        self._held = 0  # held back since the last event sent
        self._queue: deque[tuple[logging.LogRecord, int]] = deque(maxlen=MAX_QUEUED)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="plexus-log-events", daemon=True)
        self._thread.start()

    def set_rate(self, per_minute: float) -> None:
        self.per_minute = float(per_minute)

    # logging's side: any thread ---------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        if self._closed or threading.current_thread() is self._thread:
            return  # what sending an event logs is never sent again
        with self._wake:
            if not self._take_token():
                self._held += 1
                self.suppressed += 1
                return
            # The records held back since the last one that went ride on this one.
            self._queue.append((record, self._held))
            self._held = 0
            self._wake.notify()

    def _take_token(self) -> bool:
        now = self._clock()
        burst = 2 * self.per_minute
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.per_minute / 60)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    # The sending thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                record, held = self._queue.popleft()
            self._deliver(record, held)
            with self._wake:
                self._wake.notify_all()  # flush() waits for an empty queue

    def _deliver(self, record: logging.LogRecord, held: int) -> None:
        try:
            data = self.event_data(record, held)
            self._send(EVENT_NAME, data, {"level": record.levelname.lower(),
                                          "logger": record.name[:256] or "root"})
            self.sent += 1
        except Exception:  # a closed client, a refused key: the log itself must go on
            self.failed += 1

    def event_data(self, record: logging.LogRecord, held: int = 0) -> dict[str, Any]:
        """The event's data for ``record``: redacted, and cut to 4 KB of JSON."""
        data: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            data["exception"] = self._clean(f"{type(exc).__name__}: {exc}")[:500]
        if held:
            data["suppressed"] = held
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string must not lose the record
            message = f"{record.msg!r} (could not be formatted: {exc})"
        message = self._clean(message)
        data["message"] = message
        if go_json_size(_dumps(data)) > MAX_JSON_VALUE_BYTES:
            # The most characters that fit: sizes count Go's escapes (< > & are 6 bytes).
            low, high = 0, len(message)
            while low < high:
                mid = (low + high + 1) // 2
                data["message"] = message[:mid] + "..."
                if go_json_size(_dumps(data)) <= MAX_JSON_VALUE_BYTES:
                    low = mid
                else:
                    high = mid - 1
            data["message"] = message[:low] + "..."
        return data

    def _clean(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, _REDACTED)
        return _KEY_SHAPE.sub(_REDACTED, text)

    # Lifecycle ----------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> None:  # type: ignore[override]
        """Wait until the queued records are handed to the target (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._queue and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)

    def close(self) -> None:
        """Send what is queued, then stop the thread. Detach it from loggers first."""
        if not self._closed:
            self.flush()
            with self._wake:
                self._closed = True
                self._wake.notify_all()
            self._thread.join(5.0)
        super().close()


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def _dumps(data: Any) -> bytes:
    import orjson

    return orjson.dumps(data)


def _sender(target: Any) -> Sender:
    """How events reach ``target``: ``Plexus.event`` where it exists, else as a
    point through ``emit``, which validates an event's value the same way."""
    event = getattr(target, "event", None)
    if callable(event):
        return lambda name, data, tags: event(name, data, tags=tags)
    emit = getattr(target, "emit", None)
    if callable(emit):
        return lambda name, data, tags: emit(name, data, None, tags)
    send = getattr(target, "send", None)
    if callable(send):
        return lambda name, data, tags: send(name, data, tags=tags)
    if callable(target):
        return target  # type: ignore[no-any-return]
    raise TypeError(f"PlexusHandler needs a Plexus client, a pipeline or a callable, got "
                    f"{type(target).__name__}")
