"""Buffers: the only hand-off between producer threads and an uploader.

A buffer holds validated points until a sink acknowledges them. The uploader
takes one batch at a time (``take``), and either acknowledges it (``ack``:
the points leave the buffer) or gives it back (``release``: they wait again,
first in line, and can be dropped like any waiting point). ``len(buffer)``
counts every point not yet acknowledged, the batch in flight included.

When the buffer is full (``max_points``), what happens depends on the lane:

- while the sink is delivering (its last upload succeeded, no retry is
  pending) and ``when_full`` is ``"block"`` (the default), a producer waits
  for room: a producer merely faster than the link never loses data;
- while the sink is failing (an outage), or with ``when_full="drop_oldest"``,
  the oldest waiting points are dropped and counted in ``dropped``. A
  producer never hangs on a dead link.

- :class:`MemoryBuffer`: a deque; lost on a crash.
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
from typing import Any, Literal

from plexus.codec import POINTS, PointCodec
from plexus.point import Point

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 10_000
WHEN_FULL = ("block", "drop_oldest")
WhenFull = Literal["block", "drop_oldest"]
# A waiting producer re-checks this often, so close() or a failing sink frees it
# even if a notification were missed.
_WAIT_SLICE = 0.25


class Batch:
    """Points taken from a buffer, delivered together.

    ``key`` is stable for these exact points while they are sent again (and,
    for the persistent buffer, across restarts), so a retried request carries
    the same ``Idempotency-Key``; a batch whose points changed gets a new key.

    A batch from the persistent buffer may come encoded: ``body`` is a gzipped
    request body written by the codec tagged ``codec_tag``, which a sink that
    knows the codec sends as it is. ``points`` is then decoded on first use.
    """

    __slots__ = ("key", "count", "handle", "body", "codec_tag", "_points", "_decode")

    def __init__(
        self,
        key: str,
        points: list[Point] | None = None,
        handle: Any = None,
        *,
        count: int | None = None,
        body: bytes | None = None,
        codec_tag: str | None = None,
        decode: Callable[[], list[Point]] | None = None,
    ) -> None:
        if points is None and (decode is None or count is None):
            raise ValueError("a Batch needs its points, or a count and a way to decode them")
        self.key = key
        self.count = len(points) if points is not None else int(count)  # type: ignore[arg-type]
        self.handle = handle
        self.body = body
        self.codec_tag = codec_tag
        self._points = points
        self._decode = decode

    @property
    def points(self) -> list[Point]:
        if self._points is None:
            assert self._decode is not None
            self._points = self._decode()
        return self._points

    def __repr__(self) -> str:
        return f"Batch(key={self.key!r}, count={self.count})"


class Buffer:
    """Common bookkeeping; subclasses implement the storage.

    Parameters:
        max_points: the cap (see the module docstring for what "full" does).
        when_full: ``"block"`` (wait for room while the sink delivers) or
            ``"drop_oldest"`` (never wait).
    """

    def __init__(self, max_points: int, when_full: WhenFull = "block") -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {when_full!r}")
        self.max_points = max_points
        self.when_full = when_full
        self.dropped = 0  # points dropped because the buffer was full
        self.waited = 0  # times a producer waited for room (backpressure)
        self._on_ready: Callable[[], None] | None = None
        self._wake_at = 1 << 62
        self._overflowing = False
        self._episode_drops = 0
        # Set by the uploader: True while the sink delivers. Starts True: until a
        # request has failed, a full buffer means a fast producer, not an outage.
        self._healthy = True
        self._consumer_running = False  # waiting for room makes sense only while it runs
        self.codec: PointCodec = POINTS

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        """Call ``callback`` (from a producer thread) once ``at_points`` are waiting."""
        self._on_ready = callback
        self._wake_at = at_points

    def set_codec(self, codec: PointCodec) -> None:
        """How the sink of this lane wants points stored (persistent buffers use it)."""
        self.codec = codec

    def set_healthy(self, healthy: bool) -> None:
        """The uploader reports whether its sink is delivering (see ``when_full``)."""
        self._healthy = healthy
        if not healthy:
            self._notify_room()

    def set_consumer_running(self, running: bool) -> None:
        """The uploader started or stopped; without it, producers never wait for room."""
        self._consumer_running = running
        if not running:
            self._notify_room()

    def wake_on_next_put(self) -> None:
        """Call the ready callback at the next ``put``, however few points wait.

        After a delivery cycle gave up, the next reading starts a new one.
        """

    def set_block_limit(self, points: int) -> None:
        """Store at most about ``points`` points per block from now on.

        A sink with a byte budget wants requests of about one burst, and a
        buffer that stores blocks never splits one. Buffers without blocks
        ignore it.
        """

    def _should_wait(self) -> bool:
        return self.when_full == "block" and self._healthy and self._consumer_running

    def _notify_room(self) -> None:
        """Wake producers waiting for room (subclasses own the condition)."""

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self._episode_drops += n
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "%s full (%d points): dropping the oldest points until the sink delivers "
                "again", type(self).__name__, self.max_points,
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
        order), so live data can overtake a backlog. A batch given back with
        :meth:`release` comes first, with its key, while its points are intact.
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
    """A batch holds at most half the cap: during an outage the batch on the wire
    cannot be dropped, and the other half must still keep the newest points."""
    return max(1, max_points // 2)


class MemoryBuffer(Buffer):
    """An in-memory deque of points with a cap (see :class:`Buffer` for "full").

    ``put`` takes no lock: a deque append is atomic in CPython, and the only
    other work on the hot path is one length check. Crossing a threshold
    (the uploader's batch size, or the cap) takes the slow path, under the
    lock, where a producer waits for room or the oldest points beyond the cap
    are dropped and counted exactly. The cap counts the batch in flight too;
    while producers wait, each may hold one point (or one ``put_many``) above it.
    """

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS, when_full: WhenFull = "block",
                 ) -> None:
        super().__init__(max_points, when_full)
        self._queue: deque[Point] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._batch_ids = itertools.count()
        self._nonce = uuid.uuid4().hex[:12]
        self._signalled = False  # the uploader was woken since its last take
        self._wake_next = False
        self._attention_at = max_points  # queue length that needs the slow path
        # The last released batch: (key, size, first point, last point). Taken again
        # intact, it keeps its key; once a point of it was dropped, it gets a new one.
        self._resume: tuple[str, int, Point, Point] | None = None

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        super().set_ready_callback(callback, at_points)
        with self._lock:
            self._update_attention()

    def wake_on_next_put(self) -> None:
        with self._lock:
            self._wake_next = True
            self._update_attention()

    def _update_attention(self) -> None:
        room = self.max_points - self._in_flight
        if self._wake_next:
            self._attention_at = 0
        else:
            self._attention_at = room if self._signalled else min(room, self._wake_at)

    def _notify_room(self) -> None:
        with self._lock:
            self._room.notify_all()

    def put(self, point: Point) -> None:
        queue = self._queue
        queue.append(point)
        if len(queue) >= self._attention_at:
            self._attend()

    def put_many(self, points: list[Point]) -> None:
        with self._lock:  # all or nothing, as one block, never interleaved
            self._wait_for_room(len(points))
            self._queue.extend(points)
        if len(self._queue) >= self._attention_at:
            self._attend()

    def _full(self, adding: int = 0) -> bool:
        size = len(self._queue) + self._in_flight
        return size + adding > self.max_points and size > 0

    def _wait_for_room(self, adding: int = 0) -> None:
        """While the sink delivers, wait until ``adding`` more points fit. Holds the lock."""
        if not (self._full(adding) and self._should_wait()):
            return
        self.waited += 1
        if self._on_ready is not None:
            self._on_ready()  # a full buffer is worth an upload, whatever the batch size
        while self._full(adding) and self._should_wait():
            self._room.wait(_WAIT_SLICE)

    def _trim(self) -> None:
        """Drop the oldest waiting points beyond the cap. Caller holds the lock.

        Not while producers should wait instead: a point just appended over the
        cap belongs to a producer about to wait for room.
        """
        if self._should_wait():
            return
        queue = self._queue
        excess = min(len(queue) + self._in_flight - self.max_points, len(queue))
        if excess > 0:
            for _ in range(excess):
                queue.popleft()
            self._count_drops(excess)

    def _attend(self) -> None:
        with self._lock:
            # The point is already appended: wait while it is the one over the cap.
            self._wait_for_room()
            self._trim()
            queue = self._queue
            if self._on_ready and (self._wake_next or (
                    not self._signalled and len(queue) >= self._wake_at)):
                self._signalled = True
                self._wake_next = False
                self._on_ready()
            self._update_attention()

    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        with self._lock:
            # A put may have appended past the cap and not trimmed yet: trim now,
            # before the excess point can go into flight where it cannot be dropped.
            self._trim()
            queue = self._queue
            key = None
            resume, self._resume = self._resume, None
            if resume is not None:
                old_key, n, first, last = resume
                if len(queue) >= n and queue[0] is first and queue[n - 1] is last:
                    key, newest, max_points = old_key, False, n
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
        return Batch(key or f"{self._nonce}-{next(self._batch_ids)}", points)

    def ack(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight -= len(batch.points)
            self._update_attention()
            if len(self._queue) + self._in_flight <= self.max_points // 2:
                self._end_overflow_episode()
            self._room.notify_all()

    def release(self, batch: Batch) -> None:
        points = batch.points
        with self._lock:
            self._in_flight -= len(points)
            self._queue.extendleft(reversed(points))
            if points:
                self._resume = (batch.key, len(points), points[0], points[-1])
            # Back among the waiting points, the batch can be dropped like them.
            self._trim()
            self._update_attention()

    def __len__(self) -> int:
        return len(self._queue) + self._in_flight
