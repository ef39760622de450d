"""One snapshot of every counter the gateway keeps, for metrics, health and the agent.

The counters live where the work happens: an adapter's own attributes and
``health_extra()``, each uploader's ``UploaderStats``, each buffer's losses
(stored in the buffer file for the persistent buffer), the device link and
the command center. Nothing here counts anything itself, except the upload
lag, which is worked out from those counts (:class:`LagTracker`). The
Prometheus endpoint, ``/healthz``, the watchdog and the agent's points all
read the same :class:`Snapshot`, so they can never disagree.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdapterFigures", "Figures", "LagTracker", "SinkFigures", "Snapshot"]

#: Counters of the built-in adapters that count errors, by kind (docs/cli.md has
#: the table). A plugin adapter names its own in a class attribute
#: ``error_counters`` (a set of ``health_extra()`` keys).
ERROR_COUNTERS = frozenset({
    "decode_errors", "error_frames", "bus_off", "bus_errors",  # can
    "bad_payloads", "bad_timestamps", "connect_failures",  # mqtt (+ serial)
    "bad_crc", "bad_data", "seq_gaps", "lost_packets", "link_losses",  # mavlink
    "bad_lines", "bad_checksums", "overlong_lines",  # serial
})
#: Counters that count a link re-established.
RECONNECT_COUNTERS = ("reconnects", "reopens")

#: A request on the wire for three times the sink's own timeout plus this many
#: seconds means the sink is wedged: the timeout should have ended it long before.
WEDGED_GRACE = 5.0
DEFAULT_SINK_TIMEOUT = 30.0


@dataclass
class AdapterFigures:
    name: str
    type: str
    state: str
    points: int
    errors: int
    reconnects: int
    #: error counters by kind (only those the adapter has)
    error_kinds: dict[str, int]
    #: the adapter's other numeric counters and gauges (frames, messages, ...)
    details: dict[str, float]
    last_error: str | None
    last_point_age: float | None


@dataclass
class SinkFigures:
    name: str
    type: str
    buffered: int
    #: persistent buffer only: bytes on disk
    buffered_bytes: int | None
    delivered: int
    #: points that will never be delivered, by reason (``buffer_full``,
    #: ``unreadable``, ``after_gap``); rejections are apart
    dropped: dict[str, int]
    rejected: int
    retries: int
    failures: int
    requests: int
    #: about how long the oldest waiting point has waited, in seconds
    upload_lag: float
    #: wall-clock time of the last accepted request, or None
    last_success: float | None
    #: the last attempt succeeded (or none failed yet)
    delivering: bool
    auth_refused: bool
    uploader_alive: bool
    #: seconds the request on the wire has been out, or None
    sending_for: float | None
    #: a request has been out far beyond the sink's timeout
    wedged_after: float
    waited: int
    spilled: int
    torn_records: int
    health_points: int
    last_error: str | None
    persistent: bool
    #: the sink has not opened yet (retried in the background; plexus.sink_opener)
    opening: bool = False
    open_error: str | None = None

    @property
    def wedged(self) -> bool:
        return self.sending_for is not None and self.sending_for > self.wedged_after

    def last_success_age(self, now: float) -> float | None:
        return None if self.last_success is None else max(0.0, now - self.last_success)


@dataclass
class Snapshot:
    taken_at: float
    source_id: str
    uptime: float
    adapters: list[AdapterFigures]
    sinks: list[SinkFigures]
    #: the device link: state, reconnects, frames, clock offset (None: no link)
    link: dict[str, Any] | None = None
    #: remote command runs by outcome (None: no commands)
    commands: dict[str, int] | None = None
    #: the gateway's own: reloads done and failed, main loop tick age
    service: dict[str, float] = field(default_factory=dict)


class LagTracker:
    """How long the oldest waiting point of a lane has waited, from counts alone.

    Every tick records how many points have entered the lane so far
    (``left + waiting``). The oldest waiting point is number ``left + 1``; the
    first tick at which that many had entered says when it came. Points leave
    about in order (the backlog policy sends some newest ones first, so after
    an outage this is a lower bound), and the answer is good to one tick.
    Points already waiting when tracking began count as entering then.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_samples: int = 4096) -> None:
        self._clock = clock
        self._max = max(16, max_samples)
        self._times: deque[float] = deque()
        self._entered: deque[int] = deque()

    def sample(self, left: int, waiting: int) -> None:
        entered = left + waiting
        if self._entered and self._entered[-1] >= entered:
            return  # nothing new came in
        self._times.append(self._clock())
        self._entered.append(entered)
        while len(self._entered) > 1 and self._entered[0] <= left:
            self._times.popleft()  # every point of that tick has left
            self._entered.popleft()
        if len(self._entered) > self._max:
            self._thin()

    def lag(self, left: int, waiting: int) -> float:
        if waiting <= 0 or not self._entered:
            return 0.0
        entered = list(self._entered)
        index = min(bisect_left(entered, left + 1), len(entered) - 1)
        return max(0.0, self._clock() - self._times[index])

    def _thin(self) -> None:
        # A long outage: keep every other sample of the older half, so memory stays
        # bounded and old ticks lose resolution before recent ones.
        half = len(self._entered) // 2
        times, entered = list(self._times), list(self._entered)
        keep = list(range(0, half, 2)) + list(range(half, len(entered)))
        self._times = deque(times[i] for i in keep)
        self._entered = deque(entered[i] for i in keep)


class Figures:
    """Reads the counters of a running gateway (or embedded client) into snapshots.

    Parameters:
        source_id: the source's id.
        adapters: returns the adapters now running.
        lanes: returns the pipeline's lanes (sink, buffer, uploader).
        link: returns the device link, or None.
        commands: returns the command center, or None.
        service: returns the owner's own figures (reloads...), by name.
        started_at: wall-clock start, for the uptime.
    """

    def __init__(self, source_id: str, *, adapters: Callable[[], list[Any]],
                 lanes: Callable[[], list[Any]], link: Callable[[], Any] = lambda: None,
                 commands: Callable[[], Any] = lambda: None,
                 service: Callable[[], dict[str, float]] = dict,
                 started_at: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source_id = source_id
        self._adapters = adapters
        self._lanes = lanes
        self._link = link
        self._commands = commands
        self.started_at = time.time() if started_at is None else started_at
        self._clock = clock
        self._lag: dict[int, LagTracker] = {}  # by id(lane)
        self._service = service

    def tick(self) -> None:
        """Record how far each lane has got (for the upload lag); call about once a second."""
        lanes = self._lanes()
        live = {id(lane) for lane in lanes}
        for key in [k for k in self._lag if k not in live]:
            del self._lag[key]
        for lane in lanes:
            tracker = self._lag.setdefault(id(lane), LagTracker(self._clock))
            tracker.sample(*_left_and_waiting(lane))

    def snapshot(self) -> Snapshot:
        now = time.time()
        return Snapshot(
            taken_at=now, source_id=self.source_id, uptime=max(0.0, now - self.started_at),
            adapters=[adapter_figures(a, now) for a in self._adapters()],
            sinks=[self._sink(lane) for lane in self._lanes()],
            link=link_figures(self._link()), commands=command_figures(self._commands()),
            service=dict(self._service()),
        )

    def _sink(self, lane: Any) -> SinkFigures:
        sink, buffer, uploader = lane.sink, lane.buffer, lane.uploader
        stats = uploader.stats
        losses = dict(buffer.loss_counts())
        rejected = losses.pop("rejected", 0)
        since = uploader.sending_since
        timeout = getattr(getattr(sink, "options", None), "timeout", None)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            timeout = DEFAULT_SINK_TIMEOUT
        tracker = self._lag.get(id(lane))
        left, waiting = _left_and_waiting(lane)
        stored = getattr(buffer, "stored_bytes", None)
        opener = getattr(lane, "opener", None)
        opening = opener is not None and not opener.opened
        return SinkFigures(
            name=sink.name, type=getattr(sink, "type_name", "") or type(sink).__name__,
            buffered=waiting, buffered_bytes=stored if isinstance(stored, int) else None,
            delivered=stats.delivered, dropped=losses, rejected=rejected,
            retries=stats.retries, failures=stats.failures, requests=stats.requests_ok,
            upload_lag=tracker.lag(left, waiting) if tracker is not None else 0.0,
            last_success=stats.last_success, delivering=uploader.healthy,
            auth_refused=uploader.auth_error is not None,
            uploader_alive=uploader.running or opening,  # it starts once the sink opens
            sending_for=None if since is None else max(0.0, self._clock() - since),
            wedged_after=3 * float(timeout) + WEDGED_GRACE,
            waited=buffer.waited, spilled=getattr(buffer, "spilled", 0),
            torn_records=getattr(buffer, "torn_records", 0),
            health_points=uploader.side_delivered, last_error=stats.last_error,
            persistent=hasattr(buffer, "path"), opening=opening,
            open_error=opener.last_error if opener is not None and opening else None,
        )


def _left_and_waiting(lane: Any) -> tuple[int, int]:
    """Points that have left the lane in this run (delivered, refused, dropped,
    unreadable), and points waiting in it."""
    buffer, stats = lane.buffer, lane.uploader.stats
    lost = getattr(buffer, "lost", None) or {}
    return (stats.delivered + stats.rejected + buffer.dropped + sum(lost.values()),
            len(buffer))


def adapter_figures(adapter: Any, now: float) -> AdapterFigures:
    health = adapter.health()
    kinds = ERROR_COUNTERS | frozenset(getattr(adapter, "error_counters", ()))
    error_kinds: dict[str, int] = {}
    details: dict[str, float] = {}
    reconnects = 0
    for key, value in health.extra.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key in kinds:
            error_kinds[key] = int(value)
        elif key in RECONNECT_COUNTERS:
            reconnects += int(value)
        else:
            details[key] = value
    if not any(k in health.extra for k in RECONNECT_COUNTERS):
        reconnects = int(getattr(adapter, "reconnects", 0) or 0)
    return AdapterFigures(
        name=health.name, type=health.type, state=health.state, points=health.points,
        errors=health.errors, reconnects=reconnects, error_kinds=error_kinds, details=details,
        last_error=health.last_error,
        last_point_age=None if health.last_point_time is None
        else max(0.0, now - health.last_point_time),
    )


def link_figures(link: Any) -> dict[str, Any] | None:
    if link is None:
        return None
    return {"state": link.state, "up": bool(link.up), "connections": link.connections,
            "reconnects": link.reconnects, "frames_in": link.frames_in,
            "frames_out": link.frames_out, "ignored": link.ignored,
            "server_errors": link.server_errors, "clock_offset": link.clock_offset,
            "last_error": link.last_error}


def command_figures(center: Any) -> dict[str, int] | None:
    if center is None:
        return None
    return {k: int(v) for k, v in dict(center.counts).items()}
