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

A sink with upload rules (:mod:`plexus.upload_rules`) may have a second,
"held" lane: points of the metrics its ``hold`` patterns name go to a
buffer of their own, whose uploader pauses while the hold condition is
true. Which lane a metric goes to is decided once per metric name and kept
in a dict, so the hot path gains a lookup, not a pattern match. Both lanes
share the sink (taking turns) and its byte budget.

Sessions are pipeline-wide (every thread, every source): the points carry
the tag ``session_id=<id>`` plus the session's tags. Sessions nest: the
innermost one's id wins, tags merge with inner tags winning, and ending the
inner one restores the outer one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plexus.buffer import Buffer
from plexus.clock import Clock, TimeUnknown
from plexus.errors import ClientClosedError, PlexusError, PointTypeError, ValidationError
from plexus.point import (
    MAX_FUTURE_SECONDS,
    MAX_METRIC_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    Point,
    check_metric,
    check_tags,
    merge_tags,
    normalize_value,
    timestamp_ms,
    validate_source_id,
)
from plexus.ratelimit import RateLimitedLog
from plexus.sink_opener import SinkOpener
from plexus.sinks.base import Sink
from plexus.uploader import Uploader

if TYPE_CHECKING:  # imported when a sink has rules: `import plexus` stays lean
    from plexus.conditions import HoldGate
    from plexus.upload_rules import ByteBudget, UploadRules

log = logging.getLogger(__name__)
_tag_log = RateLimitedLog(log, interval=60.0)
# A metric this short cannot exceed 256 bytes of UTF-8 (4 bytes a character at most).
_FAST_METRIC_CHARS = MAX_METRIC_CHARS // 4


@dataclass
class HeldLane:
    """The second lane of a sink with hold rules: held points wait here while the gate is shut."""

    buffer: Buffer
    uploader: Uploader
    gate: HoldGate


@dataclass
class Lane:
    """One sink with its own buffer and uploader (and, with hold rules, a held lane).

    ``put``/``put_many`` store a point in this lane: the buffer's own, the hold
    rules' router, and a wrapper that adds the sink entry's tags.
    """

    sink: Sink
    buffer: Buffer
    uploader: Uploader
    rules: UploadRules | None = None
    budget: ByteBudget | None = None
    held: HeldLane | None = None
    tags: dict[str, str] | None = None
    #: set by Pipeline.start: opens the sink, retrying while it cannot (plexus.sink_opener)
    opener: SinkOpener | None = None
    put: Callable[[Point], None] = field(init=False, repr=False)
    put_many: Callable[[list[Point]], None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.put = self.buffer.put
        self.put_many = self.buffer.put_many

    def __len__(self) -> int:
        """Points of this sink not yet acknowledged, held ones included."""
        return len(self.buffer) + (len(self.held.buffer) if self.held is not None else 0)

    @property
    def dropped(self) -> int:
        return self.buffer.dropped + (self.held.buffer.dropped if self.held is not None else 0)


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
        self._put: Callable[[Point], None] = self._put_nowhere
        self._alarm: Callable[[], None] | None = None
        self._closed = False
        # The clock publishes how to stamp: a function returning Unix ns, which
        # raises TimeUnknown while no trustworthy time is known.
        self._now_ns: Callable[[], int] = time.time_ns
        self.clock = clock if clock is not None else Clock()
        self.clock.bind(self._set_stamper, self._deliver_held)

    # Building ------------------------------------------------------------
    def add_lane(
        self,
        sink: Sink,
        buffer: Buffer,
        *,
        rules: UploadRules | None = None,
        held_buffer: Buffer | None = None,
        hold_check: Callable[[], bool | None] | None = None,
        tags: dict[str, str] | None = None,
        **uploader_options: Any,
    ) -> Lane:
        """Add a sink with its own buffer (see :meth:`make_lane` for the parameters)."""
        lane = self.make_lane(sink, buffer, rules=rules, held_buffer=held_buffer,
                              hold_check=hold_check, tags=tags, **uploader_options)
        self.lanes = [*self.lanes, lane]  # a new list: readers iterate without a lock
        self.clock.attach(sink)  # a sink that hears the platform's time reports it
        self._rewire()
        return lane

    def make_lane(
        self,
        sink: Sink,
        buffer: Buffer,
        *,
        rules: UploadRules | None = None,
        held_buffer: Buffer | None = None,
        hold_check: Callable[[], bool | None] | None = None,
        tags: dict[str, str] | None = None,
        **uploader_options: Any,
    ) -> Lane:
        """A lane for ``sink`` over ``buffer``, not yet in the pipeline (:meth:`add_lane`,
        :meth:`replace_lane`); ``uploader_options`` go to :class:`Uploader`.

        Parameters:
            rules: the sink's upload rules: a byte budget, and metrics to hold.
            held_buffer: where held points wait; required when ``rules`` hold
                metrics. Make it persistent: a memory buffer drops the oldest held
                points in a long hold and loses them all on exit (a rig file that
                holds with the memory buffer is refused for that reason).
            hold_check: evaluates the hold condition instead of the rule's own
                check (for tests, and for conditions set by code).
            tags: added to every point this sink gets (the rig entry's ``tags:``);
                a point's own tags, and the gateway's, win over them.

        Raises:
            ValueError: ``rules`` hold metrics and no ``held_buffer`` is given.
        """
        holding = rules is not None and bool(rules.hold)
        if holding and held_buffer is None:
            raise ValueError(f"sink {sink.name}: hold rules need a held_buffer")
        codec = sink.codec(self.source_id)
        buffer.set_codec(codec)  # a persistent buffer stores what is sent
        budget = None
        if rules is not None and rules.max_bytes_per_s:
            from plexus.upload_rules import ByteBudget

            budget = ByteBudget(rules.max_bytes_per_s, rules.burst_bytes)
        send_lock = threading.Lock() if holding else None
        lane = Lane(sink, buffer, Uploader(buffer, sink, budget=budget, send_lock=send_lock,
                                           **uploader_options), rules, budget)
        if holding:
            assert rules is not None and held_buffer is not None
            from plexus.conditions import HoldGate  # subprocess & co. only when a rig holds
            from plexus.upload_rules import MetricRouter

            held_buffer.set_codec(codec)
            gate = HoldGate(sink.name, rules, held_buffer, check=hold_check)
            held_uploader = Uploader(held_buffer, sink, budget=budget, send_lock=send_lock,
                                     gate=gate.is_open, label=f"{sink.name} (held)",
                                     **uploader_options)
            gate.add_listener(held_uploader.wake)
            lane.held = HeldLane(held_buffer, held_uploader, gate)
            router = MetricRouter(rules.hold, rules.always, buffer.put, held_buffer.put,
                                  buffer.put_many, held_buffer.put_many)
            lane.put, lane.put_many = router.put, router.put_many
        if tags:
            lane.tags = dict(check_tags(tags))
            lane.put, lane.put_many = _tagging(lane.put, lane.put_many, lane.tags)
        return lane

    def replace_lane(self, old: Lane, new: Lane) -> None:
        """Put ``new`` where ``old`` was (a reload handed its buffer over)."""
        self.lanes = [new if lane is old else lane for lane in self.lanes]
        self.clock.attach(new.sink)
        self._rewire()

    def remove_lane(self, lane: Lane) -> None:
        """Stop putting points in ``lane`` (a reload removed its sink); the caller
        drains and closes it."""
        self.lanes = [other for other in self.lanes if other is not lane]
        self._rewire()

    def _rewire(self) -> None:
        if self._closed:
            return
        lanes = self.lanes
        if not lanes:
            self._put = self._put_nowhere
        elif len(lanes) == 1:
            self._put = lanes[0].put
        else:
            self._put = self._put_everywhere

    def set_tags(self, tags: dict[str, str] | None) -> None:
        """Replace the global tags (a reload); sessions keep theirs.

        Raises:
            ValidationError: invalid tags; nothing changed.
        """
        checked = dict(check_tags(tags)) if tags else None
        with self._session_lock:
            old, self._global_tags = self._global_tags, checked
            try:
                self._context_tags = self._compute_context_tags()
            except ValidationError:
                self._global_tags = old
                raise

    def start(self) -> None:
        """Open each sink and start its uploader; a sink that cannot open is retried in
        the background while the others deliver (see :mod:`plexus.sink_opener`)."""
        for lane in self.lanes:
            self.open_lane(lane)
        self.clock.start()

    def open_lane(self, lane: Lane) -> None:
        """Open a lane's sink (retried in the background while it cannot), then
        start its uploaders."""
        lane.opener = SinkOpener(lane.sink, self.source_id,
                                 functools.partial(_start_uploading, lane))
        lane.opener.start()

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
            context = self._context_tags
            self._hold([(metric, value, context if tags is None else merge_tags(context, tags))])
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
        readings: Sequence[tuple[str, Any] | tuple[str, Any, float | None]],
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> int:
        """Validate every ``(metric, value)`` or ``(metric, value, timestamp)``,
        then buffer them all at once.

        A reading without its own timestamp (or with None) takes ``timestamp``,
        default now, the same for the whole call. All-or-nothing: if any
        reading is invalid, nothing is buffered and the error names the
        reading's position. Returns the number buffered.
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
        # Checked once per call: a timestamp up to this is not in the far future.
        latest = time.time() + MAX_FUTURE_SECONDS
        points: list[Point] = []
        for i, reading in enumerate(readings):
            try:
                if len(reading) == 2:
                    metric, value = reading
                    when = None
                else:
                    metric, value, when = reading  # type: ignore[misc]
            except (ValueError, TypeError) as exc:
                raise PointTypeError(
                    f"points[{i}] must be a (metric, value) or (metric, value, timestamp) "
                    f"tuple, got {reading!r:.80}"
                ) from exc
            try:
                # The same fast checks as emit(); anything unusual takes the full one.
                if type(metric) is not str or not 0 < len(metric) <= _FAST_METRIC_CHARS:
                    check_metric(metric)
                if type(value) is not float or value - value != 0.0:
                    value = normalize_value(metric, value)
                if when is None:
                    point_ts = ts
                elif (type(when) is float or type(when) is int) and 0 <= when <= latest:
                    point_ts = int(when * 1000)
                else:
                    point_ts = timestamp_ms(when)
            except PlexusError as exc:
                raise type(exc)(f"points[{i}]: {exc}") from exc
            points.append((metric, value, point_ts, point_tags))
        count = len(points)
        if ts == -1:  # no trustworthy time yet: the points without their own wait in the clock
            self._hold([(m, v, t) for m, v, ts_, t in points if ts_ == -1])
            points = [point for point in points if point[2] != -1]
        if points:
            for lane in self.lanes:
                lane.put_many(points)
        if self._alarm is not None:
            self._alarm()
        return count

    # Stamping (the clock calls these) ------------------------------------------
    def _set_stamper(self, now_ns: Callable[[], int]) -> None:
        self._now_ns = now_ns

    def _hold(self, readings: list[tuple[str, Any, dict[str, str] | None]]) -> None:
        """Readings (with their final tags) taken while no trustworthy time is known:
        they wait in the clock."""
        if self._closed:
            raise ClientClosedError("this client is closed; create a new Plexus() to send")
        if not self.lanes:
            raise PlexusError("the pipeline has no sink")
        for point in self.clock.hold(readings):  # the time became known meanwhile
            self._put(point)

    def _deliver_held(self, points: list[Point]) -> None:
        """Held points, stamped now that the time is known: into every lane."""
        for lane in self.lanes:
            try:
                lane.put_many(points)
            except PlexusError as exc:  # one lane failing must not cost the others theirs
                log.error("%d points held until the time was known could not be buffered "
                          "for %s: %s", len(points), lane.sink.name, exc)

    def emit_side(self, readings: Sequence[tuple[str, Any, dict[str, str] | None]]) -> int:
        """Validate and stamp ``(metric, value, tags)`` like any reading, and queue
        them on each lane's side queue (``Uploader.side``), apart from the sinks'
        buffers: the gateway's own health points (plexus.service.agent), which
        must never be counted in the figures they report. Returns the number queued:
        none while no trustworthy time is known (a health report is not worth
        holding: the next one carries the same running totals).
        """
        try:
            ts = self._now_ns() // 1_000_000
        except TimeUnknown:
            log.debug("%d health points not sent: no trustworthy time yet", len(readings))
            return 0
        points: list[Point] = []
        for metric, value, tags in readings:
            check_metric(metric)
            points.append((metric, normalize_value(metric, value), ts,
                           merge_tags(self._context_tags, tags)))
        for lane in self.lanes:
            side = lane.uploader.side
            if side is not None:
                side.put_many(points)
        return len(points)

    def _put_nowhere(self, point: Point) -> None:
        raise PlexusError("the pipeline has no sink")

    def _put_closed(self, point: Point) -> None:
        # Swapped in by close(): the hot path needs no "closed?" check of its own.
        raise ClientClosedError("this client is closed; create a new Plexus() to send")

    def _put_everywhere(self, point: Point) -> None:
        errors: list[PlexusError] = []
        for lane in self.lanes:
            try:
                lane.put(point)
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
        """Points not yet acknowledged by every sink (the slowest sink's count, held included)."""
        return max((len(lane) for lane in self.lanes), default=0)

    @property
    def dropped(self) -> int:
        return sum(lane.dropped for lane in self.lanes)

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what every lane holds; False when held points stay (a hold is on)."""
        done = True
        for lane in self.lanes:
            lane.uploader.flush(timeout)
            if lane.held is not None:
                done = lane.held.uploader.flush(timeout) and done
        return done

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
        for lane in self.lanes:
            if lane.opener is not None:
                lane.opener.stop(max(0.0, deadline - time.monotonic()))
        threads = []
        for lane in self.lanes:
            uploaders = [lane.uploader] + ([lane.held.uploader] if lane.held else [])
            for uploader in uploaders:
                if uploader.running:
                    # Lanes drain in parallel so one dead sink does not eat the others'
                    # time. A held lane that is holding stops at once.
                    thread = threading.Thread(
                        target=uploader.stop, args=(max(0.0, deadline - time.monotonic()),)
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
            held = lane.held
            try:
                if held is not None:
                    held.gate.stop()
                    if len(held.buffer):
                        log.log(logging.INFO if _persistent(held.buffer) else logging.WARNING,
                                "%d held points of %s %s", len(held.buffer), lane.sink.name,
                                "stay in the persistent buffer until the hold clears"
                                if _persistent(held.buffer) else "are lost (memory buffer)")
                    held.buffer.close()
            finally:
                try:
                    lane.buffer.close()
                finally:
                    if lane.opener is not None and lane.opener.opened:
                        lane.sink.close()


def _start_uploading(lane: Lane) -> None:
    lane.uploader.start()
    if lane.held is not None:
        lane.held.uploader.start()
        lane.held.gate.start()


def _tagging(put: Callable[[Point], None], put_many: Callable[[list[Point]], None],
             tags: dict[str, str],
             ) -> tuple[Callable[[Point], None], Callable[[list[Point]], None]]:
    """``put``/``put_many`` that add a sink entry's tags under the point's own."""
    # Points of one source share their tags dict, so the merge is kept for the last
    # one seen: an identity check per point, not a merge. One tuple in one slot, so
    # producer threads never see one dict's merge filed under another's.
    last: list[tuple[Any, dict[str, str]]] = [(None, tags)]

    def merged(point_tags: dict[str, str] | None) -> dict[str, str]:
        seen, result = last[0]
        if point_tags is seen:
            return result
        result = {**tags, **point_tags} if point_tags else tags
        if len(result) > MAX_TAGS:
            # The platform would reject the point; deliver it as the other sinks do.
            _tag_log(logging.WARNING, "a point with %d tags has no room for the sink's %d "
                     "tags (at most %d a point); sent without them", len(point_tags or ()),
                     len(tags), MAX_TAGS)
            result = point_tags or {}
        last[0] = (point_tags, result)
        return result

    def tagged_put(point: Point) -> None:
        put((point[0], point[1], point[2], merged(point[3])))

    def tagged_put_many(points: list[Point]) -> None:
        put_many([(p[0], p[1], p[2], merged(p[3])) for p in points])

    return tagged_put, tagged_put_many



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
