"""``px.batch()``: the official SDK's sender for fast streams, as a thin view of the client.

In the SDK every ``send()`` is one WebSocket message and the platform limits
messages, so its ``batch()`` queues readings and sends one message per
interval. Here every ``send()`` already goes into the client's buffer, and
the uploader sends what waits as one request (up to 10,000 points) when
``batch_size`` points wait or every ``flush_interval``. So a
:class:`BatchSender` queues nothing of its own: ``b.send()`` *is*
``px.send()``, and its knobs are checked as the SDK checks them and
otherwise map onto the client's settings (docs/migrating.md has the table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from plexus.errors import ClientClosedError, ConfigError

if TYPE_CHECKING:
    from plexus.client import Plexus

#: The SDK's lower bound on ``interval_ms`` (its flush thread's floor).
MIN_INTERVAL_MS = 2.0


class BatchSender:
    """Send a fast stream through the client; use as ``with px.batch() as b:``.

    ``b.send(metric, value, timestamp=None, tags=None)`` and
    ``b.send_batch(points, timestamp=None, tags=None)`` are the client's own
    ``send``/``send_batch``: validated at the call (a bad point raises there),
    buffered with the timestamp taken at the call, and delivered in batches
    by the client's uploader. Leaving the block returns at once; nothing waits
    in the sender, and ``px.close()`` or ``px.flush_buffer()`` wait for
    delivery.

    Parameters:
        client: the :class:`~plexus.Plexus` to send through.
        interval_ms: the SDK's flush interval. Nothing is held here, so it
            changes nothing; the client's ``flush_interval`` (1 s) and
            ``batch_size`` (1,000) decide when a request leaves.
        max_points: the SDK's points per message; each request here carries
            up to 10,000 points.
        max_pending: the SDK's queue cap; the cap here is the client's buffer
            (``max_buffer_points``), with its ``when_full`` behaviour.

    Raises:
        ConfigError: (a ValueError, as in the SDK) ``interval_ms`` below 2,
            ``max_points`` below 1 or ``max_pending`` below ``max_points``.
    """

    def __init__(self, client: Plexus, interval_ms: float = 100.0, max_points: int = 5000,
                 max_pending: int = 200_000) -> None:
        if not interval_ms >= MIN_INTERVAL_MS:
            raise ConfigError(f"interval_ms must be at least {MIN_INTERVAL_MS:g}, got "
                              f"{interval_ms!r}")
        if max_points < 1:
            raise ConfigError(f"max_points must be at least 1, got {max_points!r}")
        if max_pending < max_points:
            raise ConfigError(f"max_pending must be at least max_points ({max_points}), got "
                              f"{max_pending!r}")
        self.interval_ms = interval_ms
        self.max_points = max_points
        self.max_pending = max_pending
        self._client = client
        self._dropped_before = client.dropped
        self._dropped_while_open: int | None = None
        # The client's own methods, bound once: a send through the sender costs
        # what px.send() costs. close() swaps them for ones that raise.
        self.send = client.send  # type: ignore[method-assign]
        self.send_batch = client.send_batch  # type: ignore[method-assign]

    def send(self, metric: str, value: Any, timestamp: float | None = None,
             tags: dict[str, str] | None = None) -> bool:
        """Buffer one reading; exactly :meth:`Plexus.send`."""
        return self._client.send(metric, value, timestamp, tags)

    def send_batch(self, points: Sequence[tuple[str, Any] | tuple[str, Any, float | None]],
                   timestamp: float | None = None, tags: dict[str, str] | None = None) -> bool:
        """Buffer several readings; exactly :meth:`Plexus.send_batch` (3-tuples too)."""
        return self._client.send_batch(points, timestamp, tags)

    def flush(self) -> None:
        """Wait until everything the client buffered is delivered (``px.flush_buffer()``).

        Raises:
            DeliveryError / AuthenticationError: as ``flush_buffer``; the
                points stay buffered.
        """
        self._client.flush_buffer()

    @property
    def pending(self) -> int:
        """Points waiting in the sender: always 0, every point goes straight to
        the client's buffer (``px.buffer_size()`` counts those)."""
        return 0

    @property
    def dropped(self) -> int:
        """Points the client's buffer dropped (oldest first, only while delivery
        fails and the buffer is full) while this sender was open."""
        if self._dropped_while_open is not None:
            return self._dropped_while_open
        return self._client.dropped - self._dropped_before

    def start(self) -> BatchSender:
        """Nothing to start (no thread); returns the sender, as in the SDK."""
        return self

    def close(self) -> None:
        """Stop accepting points (later sends raise ClientClosedError); idempotent.
        Returns at once: what was sent is in the client's buffer already."""
        if self._dropped_while_open is None:
            self._dropped_while_open = self._client.dropped - self._dropped_before
        self.send = self._closed  # type: ignore[method-assign]
        self.send_batch = self._closed  # type: ignore[method-assign]

    def _closed(self, *args: Any, **kwargs: Any) -> bool:
        raise ClientClosedError("this batch sender is closed; open a new one with px.batch()")

    def __enter__(self) -> BatchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._dropped_while_open is not None else "open"
        return f"BatchSender({state}, interval_ms={self.interval_ms:g}, dropped={self.dropped})"
