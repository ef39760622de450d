"""The one pipeline every source feeds: validate → stamp → buffer(s) → uploader(s) → sink(s).

Every source (``Plexus.send``, adapters, callables) calls :meth:`Pipeline.emit`.
The pipeline validates the point (``plexus.point``), stamps it with the
global tags and the current session, and puts it in the buffer of every sink
("lane"). Each lane has its own buffer and uploader thread, so fan-out to
several sinks never lets a slow or failing sink stall or starve another:
the failing one's buffer fills (and, if it overflows, drops its own oldest
points, counted) while the others keep delivering.

Points without a timestamp are stamped by the pipeline's :class:`~plexus.clock.Clock`,
which decides off the hot path whether the system clock can be trusted; while
no trustworthy time is known, such points wait in the clock, not in the
buffers (docs/time.md).

Sessions are pipeline-wide (every thread, every source): the points carry
the tag ``session_id=<id>`` plus the session's tags. Sessions nest: the
innermost one's id wins, tags merge with inner tags winning, and ending the
inner one restores the outer one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from plexus.buffer import Buffer
from plexus.clock import Clock, TimeUnknown
from plexus.errors import ClientClosedError, PlexusError, PointTypeError, ValidationError
from plexus.point import (
    MAX_METRIC_CHARS,
    MAX_TAG_CHARS,
    Point,
    check_metric,
    check_tags,
    merge_tags,
    normalize_value,
    timestamp_ms,
    validate_source_id,
)
from plexus.sinks.base import Sink
from plexus.uploader import Uploader

log = logging.getLogger(__name__)
# A metric this short cannot exceed 256 bytes of UTF-8 (4 bytes a character at most).
_FAST_METRIC_CHARS = MAX_METRIC_CHARS // 4


@dataclass
class Lane:
    """One sink with its own buffer and uploader."""

    sink: Sink
    buffer: Buffer
    uploader: Uploader


class Pipeline:
    """Validate, stamp and fan points out to every sink's buffer.

    Parameters:
        source_id: the platform's source id (``^[a-z0-9][a-z0-9._-]*$``).
        tags: global tags added to every point (a point's own tags win).
        clock: stamps points sent without a timestamp (default: a
            :class:`~plexus.clock.Clock` on the system clock).

    Raises:
        ValidationError: for an invalid ``source_id`` or tags.
    """

    def __init__(self, source_id: str, tags: dict[str, str] | None = None,
                 clock: Clock | None = None) -> None:
        self.source_id = validate_source_id(source_id)
        self.lanes: list[Lane] = []
        self._global_tags = dict(check_tags(tags)) if tags else None
        self._sessions: list[tuple[str, dict[str, str]]] = []
        self._session_lock = threading.Lock()
        self._context_tags: dict[str, str] | None = self._global_tags
        self._put = self._put_nowhere
        self._alarm: Callable[[], None] | None = None
        self._closed = False
        # The clock publishes how to stamp: a function returning Unix ns, which
        # raises TimeUnknown while no trustworthy time is known.
        self._now_ns: Callable[[], int] = time.time_ns
        self.clock = clock if clock is not None else Clock()
        self.clock.bind(self._set_stamper, self._deliver_held)

    # Building ------------------------------------------------------------
    def add_lane(self, sink: Sink, buffer: Buffer, **uploader_options: Any) -> Lane:
        """Add a sink with its own buffer; ``uploader_options`` go to :class:`Uploader`."""
        buffer.set_codec(sink.codec(self.source_id))  # a persistent buffer stores what is sent
        lane = Lane(sink, buffer, Uploader(buffer, sink, **uploader_options))
        self.lanes.append(lane)
        self.clock.attach(sink)  # a sink that hears the platform's time reports it
        if len(self.lanes) == 1:
            self._put = buffer.put
        else:
            self._put = self._put_everywhere
        return lane

    def start(self) -> None:
        for lane in self.lanes:
            lane.sink.open(self.source_id)
            lane.uploader.start()
        self.clock.start()

    # The hot path --------------------------------------------------------
    def emit(
        self,
        metric: str,
        value: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Validate one reading, stamp it and buffer it in every lane; return True.

        Raises:
            ValidationError / PointTypeError: the point breaks a protocol rule;
                nothing was buffered.
            ClientClosedError: the pipeline is closed.
            BufferingError: a buffer could not store it.
            Whatever the alarm raises (see :meth:`set_alarm`), after buffering.
        """
        # The common case (a str metric, a finite float, no timestamp, no tags)
        # costs a handful of comparisons; anything else takes the full check.
        if type(metric) is not str or not 0 < len(metric) <= _FAST_METRIC_CHARS:
            check_metric(metric)
        if type(value) is not float or value - value != 0.0:
            value = normalize_value(metric, value)
        # Attribute loads CPython specializes (a call self._put(...) of an instance
        # attribute is not): about 100 instructions less a point.
        now_ns, put = self._now_ns, self._put
        try:
            put((
                metric,
                value,
                now_ns() // 1_000_000 if timestamp is None else timestamp_ms(timestamp),
                self._context_tags if tags is None else merge_tags(self._context_tags, tags),
            ))
        except TimeUnknown:
            # No trustworthy time yet: the clock's stamping function said so, which
            # keeps the trusted path free of any check of its own. The point waits.
            return self._hold([(metric, value, tags)])
        if self._alarm is not None:
            self._alarm()
        return True

    def set_alarm(self, alarm: Callable[[], None] | None) -> None:
        """Call ``alarm`` after each point is buffered (it may raise), or stop with None.

        The client uses it to raise AuthenticationError from ``send()`` while
        the key is missing or refused, without a check of its own per call.
        """
        self._alarm = alarm

    def emit_many(
        self,
        readings: Sequence[tuple[str, Any]],
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> int:
        """Validate every ``(metric, value)``, then buffer them all at once.

        All-or-nothing: if any reading is invalid, nothing is buffered and the
        error names the reading's position. Returns the number buffered.
        """
        if self._closed:
            raise ClientClosedError("this client is closed; create a new Plexus() to send")
        if timestamp is not None:
            ts = timestamp_ms(timestamp)
        else:
            try:
                ts = self._now_ns() // 1_000_000
            except TimeUnknown:
                ts = -1  # no trustworthy time yet: they will wait in the clock
        point_tags = self._context_tags if tags is None else merge_tags(self._context_tags, tags)
        points: list[Point] = []
        for i, reading in enumerate(readings):
            try:
                metric, value = reading
            except (ValueError, TypeError) as exc:
                raise PointTypeError(
                    f"points[{i}] must be a (metric, value) tuple, got {reading!r:.80}"
                ) from exc
            try:
                check_metric(metric)
                points.append((metric, normalize_value(metric, value), ts, point_tags))
            except PlexusError as exc:
                raise type(exc)(f"points[{i}]: {exc}") from exc
        if ts == -1:  # no trustworthy time yet: they wait in the clock
            self._hold([(metric, value, tags) for metric, value, _ts, tags in points])
            return len(points)
        for lane in self.lanes:
            lane.buffer.put_many(points)
        if self._alarm is not None:
            self._alarm()
        return len(points)

    # Stamping (the clock calls these) ------------------------------------------
    def _set_stamper(self, now_ns: Callable[[], int]) -> None:
        self._now_ns = now_ns

    def _hold(self, readings: list[tuple[str, Any, dict[str, str] | None]]) -> bool:
        """Points without a timestamp while the time is unknown: they wait in the clock."""
        if self._closed:
            raise ClientClosedError("this client is closed; create a new Plexus() to send")
        if not self.lanes:
            raise PlexusError("the pipeline has no sink")
        context = self._context_tags
        stamped = self.clock.hold(
            [(m, v, context if t is None else merge_tags(context, t)) for m, v, t in readings])
        for point in stamped:  # the time became known meanwhile
            self._put(point)
        if self._alarm is not None:
            self._alarm()
        return True

    def _deliver_held(self, points: list[Point]) -> None:
        """Held points, stamped now that the time is known: into every lane."""
        for lane in self.lanes:
            try:
                lane.buffer.put_many(points)
            except PlexusError as exc:  # one lane failing must not cost the others theirs
                log.error("%d points held until the time was known could not be buffered "
                          "for %s: %s", len(points), lane.sink.name, exc)

    def _put_nowhere(self, point: Point) -> None:
        raise PlexusError("the pipeline has no sink")

    def _put_closed(self, point: Point) -> None:
        # Swapped in by close(): the hot path needs no "closed?" check of its own.
        raise ClientClosedError("this client is closed; create a new Plexus() to send")

    def _put_everywhere(self, point: Point) -> None:
        errors: list[PlexusError] = []
        for lane in self.lanes:
            try:
                lane.buffer.put(point)
            except PlexusError as exc:  # one sink's buffer failing must not starve the others
                errors.append(exc)
        if errors:
            raise errors[0]

    # Sessions ------------------------------------------------------------
    def begin_session(self, session_id: str, tags: dict[str, str] | None = None) -> None:
        """Tag every following point with ``session_id`` (and ``tags``) until ended."""
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_TAG_CHARS:
            raise ValidationError(
                f"session_id must be a string of 1..{MAX_TAG_CHARS} characters, got {session_id!r}"
            )
        with self._session_lock:
            session_tags = {**(check_tags(tags) if tags else {}), "session_id": session_id}
            self._sessions.append((session_id, session_tags))
            try:
                self._context_tags = self._compute_context_tags()
            except ValidationError:
                self._sessions.pop()
                raise

    def end_session(self, session_id: str) -> None:
        """End the innermost session named ``session_id``; others stay as they were."""
        with self._session_lock:
            for i in range(len(self._sessions) - 1, -1, -1):
                if self._sessions[i][0] == session_id:
                    del self._sessions[i]
                    break
            else:
                log.warning("end_session(%r): no such session is open", session_id)
            self._context_tags = self._compute_context_tags()

    @contextlib.contextmanager
    def session(self, session_id: str, tags: dict[str, str] | None = None) -> Iterator[None]:
        self.begin_session(session_id, tags)
        try:
            yield
        finally:
            self.end_session(session_id)

    @property
    def current_session(self) -> str | None:
        sessions = self._sessions
        return sessions[-1][0] if sessions else None

    def _compute_context_tags(self) -> dict[str, str] | None:
        tags = self._global_tags
        for _sid, session_tags in self._sessions:
            tags = merge_tags(tags, session_tags)
        return dict(tags) if tags else None

    # Delivery ------------------------------------------------------------
    def __len__(self) -> int:
        """Points not yet acknowledged by every sink (the slowest lane's count)."""
        return max((len(lane.buffer) for lane in self.lanes), default=0)

    @property
    def dropped(self) -> int:
        return sum(lane.buffer.dropped for lane in self.lanes)

    def flush(self, timeout: float | None = None) -> bool:
        for lane in self.lanes:
            lane.uploader.flush(timeout)
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting points, deliver for up to ``timeout`` seconds, release everything."""
        if self._closed:
            return
        self._closed = True
        self._put = self._put_closed
        deadline = time.monotonic() + timeout
        self.clock.stop()  # held points reach the buffers now if the time is known
        threads = []
        for lane in self.lanes:
            if lane.uploader.running:
                # Lanes drain in parallel so one dead sink does not eat the others' time.
                thread = threading.Thread(
                    target=lane.uploader.stop, args=(max(0.0, deadline - time.monotonic()),)
                )
                thread.start()
                threads.append(thread)
        for thread in threads:
            thread.join()
        for lane in self.lanes:
            left = len(lane.buffer)
            if left:
                log.warning("%d points were not delivered to %s before shutdown%s", left,
                            lane.sink.name,
                            "; they stay in the persistent buffer" if _persistent(lane.buffer)
                            else " and are lost (memory buffer)")
            try:
                lane.buffer.close()
            finally:
                lane.sink.close()


def _persistent(buffer: Buffer) -> bool:
    return hasattr(buffer, "path")


class SourceContext:
    """What an adapter sees of the pipeline: ``emit`` with the adapter's own tags, and sessions.

    Parameters:
        pipeline: the pipeline to feed.
        tags: static tags of this source (from the rig file), added to each point;
            a point's own tags win over them.
    """

    def __init__(self, pipeline: Pipeline, tags: dict[str, str] | None = None) -> None:
        self._pipeline = pipeline
        self._tags = dict(check_tags(tags)) if tags else None
        self._emit = pipeline.emit
        #: how the pipeline stamps (``now()``, ``from_wall()``) and where time
        #: references go (``observe()``): see :mod:`plexus.clock`
        self.clock = pipeline.clock

    def emit(
        self,
        metric: str,
        value: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        if self._tags is not None:
            tags = self._tags if tags is None else {**self._tags, **tags}
        self._emit(metric, value, timestamp, tags)

    def begin_session(self, session_id: str, tags: dict[str, str] | None = None) -> None:
        self._pipeline.begin_session(session_id, tags)

    def end_session(self, session_id: str) -> None:
        self._pipeline.end_session(session_id)
