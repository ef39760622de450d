"""Buffers: the only hand-off between producer threads and an uploader.

A buffer holds validated points until a sink acknowledges them. The uploader
takes one batch at a time (``take``), and either acknowledges it (``ack``:
the points leave the buffer) or gives it back (``release``: they are sent
again later, first in line). ``len(buffer)`` counts every point not yet
acknowledged, the batch in flight included.

- :class:`MemoryBuffer`: a deque capped at ``max_points``; when full the
  oldest waiting point is dropped and counted. Lost on a crash.
- :class:`~plexus.sqlite_buffer.SqliteBuffer`: every point is on disk before
  ``put`` returns, so it survives ``kill -9``; see its module for power loss.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plexus.point import Point

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 10_000


@dataclass
class Batch:
    """Points taken from a buffer, delivered together.

    ``key`` is stable for these exact points while they stay in flight (and,
    for the SQLite buffer, across restarts), so a retried request carries the
    same ``Idempotency-Key``.
    """

    key: str
    points: list[Point]
    handle: Any = field(default=None, repr=False)


class Buffer:
    """Common bookkeeping; subclasses implement the storage."""

    def __init__(self, max_points: int) -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        self.max_points = max_points
        self.dropped = 0  # points dropped because the buffer was full
        self._on_ready: Callable[[], None] | None = None
        self._wake_at = 1 << 62
        self._overflowing = False
        self._episode_drops = 0

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        """Call ``callback`` (from a producer thread) once ``at_points`` are waiting."""
        self._on_ready = callback
        self._wake_at = at_points

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self._episode_drops += n
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "%s full (%d points): dropping the oldest points until the uploader catches up",
                type(self).__name__, self.max_points,
            )

    def _end_overflow_episode(self) -> None:
        # Called once the buffer has drained to half, so a sustained overload
        # is one episode (two log lines), not a line per batch.
        if self._overflowing:
            log.warning(
                "%s overflow ended: %d oldest points were dropped (%d in total since start)",
                type(self).__name__, self._episode_drops, self.dropped,
            )
            self._overflowing = False
            self._episode_drops = 0

    # Interface -----------------------------------------------------------
    def put(self, point: Point) -> None:
        raise NotImplementedError

    def put_many(self, points: list[Point]) -> None:
        raise NotImplementedError

    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        """Mark up to ``max_points`` as in flight and return them, oldest first.

        ``newest`` takes them from the newest end instead (still in time
        order), so live data can overtake a backlog.
        """
        raise NotImplementedError

    def ack(self, batch: Batch) -> None:
        raise NotImplementedError

    def release(self, batch: Batch) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; waiting points of a persistent buffer stay stored."""


def in_flight_limit(max_points: int) -> int:
    """A batch holds at most half the cap: during an outage the batch in flight
    cannot be dropped, and the other half must still keep the newest points."""
    return max(1, max_points // 2)


class MemoryBuffer(Buffer):
    """An in-memory ring of points, dropping the oldest when full.

    ``put`` takes no lock: a deque append is atomic in CPython, and the only
    other work on the hot path is one length check. Crossing a threshold
    (the uploader's batch size, or the cap) takes the slow path, under the
    lock, where the oldest points beyond the cap are dropped and counted
    exactly. The cap counts the batch in flight too, so ``len()`` never
    exceeds ``max_points``.
    """

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS) -> None:
        super().__init__(max_points)
        self._queue: deque[Point] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._batch_ids = itertools.count()
        self._nonce = uuid.uuid4().hex[:12]
        self._signalled = False  # the uploader was woken since its last take
        self._attention_at = max_points  # queue length that needs the slow path

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        super().set_ready_callback(callback, at_points)
        with self._lock:
            self._update_attention()

    def _update_attention(self) -> None:
        room = self.max_points - self._in_flight
        self._attention_at = room if self._signalled else min(room, self._wake_at)

    def put(self, point: Point) -> None:
        queue = self._queue
        queue.append(point)
        if len(queue) >= self._attention_at:
            self._attend()

    def put_many(self, points: list[Point]) -> None:
        queue = self._queue
        with self._lock:  # all or nothing, as one block, never interleaved
            queue.extend(points)
        if len(queue) >= self._attention_at:
            self._attend()

    def _trim(self) -> None:
        """Drop the oldest waiting points beyond the cap. Caller holds the lock."""
        queue = self._queue
        excess = min(len(queue) + self._in_flight - self.max_points, len(queue))
        if excess > 0:
            for _ in range(excess):
                queue.popleft()
            self._count_drops(excess)

    def _attend(self) -> None:
        with self._lock:
            self._trim()
            queue = self._queue
            if not self._signalled and len(queue) >= self._wake_at and self._on_ready:
                self._signalled = True
                self._on_ready()
            self._update_attention()

    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        with self._lock:
            # A put may have appended past the cap and not trimmed yet: trim now,
            # before the excess point can go into flight where it cannot be dropped.
            self._trim()
            queue = self._queue
            n = min(max_points, len(queue), in_flight_limit(self.max_points))
            if newest:
                # pop() races only with appends of even newer points, which is fine.
                points = [queue.pop() for _ in range(n)]
                points.reverse()
            else:
                # popleft only: producers append on the right without the lock.
                points = [queue.popleft() for _ in range(n)]
            self._in_flight += len(points)
            self._signalled = False
            self._update_attention()
        if not points:
            return None
        return Batch(f"{self._nonce}-{next(self._batch_ids)}", points)

    def ack(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight -= len(batch.points)
            self._update_attention()
            if len(self._queue) + self._in_flight <= self.max_points // 2:
                self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight -= len(batch.points)
            self._queue.extendleft(reversed(batch.points))
            self._update_attention()

    def __len__(self) -> int:
        return len(self._queue) + self._in_flight

