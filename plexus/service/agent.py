"""The gateway's own health, sent as ordinary points every ``interval`` seconds.

So a fleet owner sees on the platform which vehicle lost what, and why:

==============================  ==================  =========================================
metric                          tags                value
==============================  ==================  =========================================
``plexus.agent.buffered``       sink                points waiting now
``plexus.agent.delivered``      sink                points delivered (running total)
``plexus.agent.dropped``        sink, reason        points that will never be delivered
                                                    (running total; ``buffer_full`` always,
                                                    other reasons once they happen)
``plexus.agent.rejected``       sink                points the sink refused (running total)
``plexus.agent.retries``        sink                retried requests (running total)
``plexus.agent.upload_lag_s``   sink                about how long the oldest waiting point
                                                    has waited
``plexus.agent.adapter_errors`` adapter, kind       errors (``kind=all``) and each kind seen
                                                    (running totals)
``plexus.agent.uptime_s``                           seconds since the start
==============================  ==================  =========================================

Running totals start at zero when the process starts, except ``dropped``
and ``rejected`` with the persistent buffer: those are stored in the buffer
file and carry on across restarts and crashes.

The points are stamped and tagged like any reading (the rig's tags
included) but never enter the sinks' buffers: each lane gets a small side
queue (``Uploader.side``, a memory ring of ``max_waiting`` points, oldest
dropped) that its uploader sends between batches while the sink delivers.
So they are never counted in the figures they report, and a report that
waits through an outage goes out when it ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from plexus.buffer import MemoryBuffer
from plexus.service.figures import Figures, Snapshot

__all__ = ["AgentReporter", "readings"]

log = logging.getLogger(__name__)

PREFIX = "plexus.agent."
DEFAULT_INTERVAL = 60.0
#: Side queue per sink: about 16 hours of reports for a small rig.
DEFAULT_MAX_WAITING = 10_000

Reading = tuple[str, Any, dict[str, str] | None]


def readings(snapshot: Snapshot) -> list[Reading]:
    """The points of one report."""
    out: list[Reading] = [(PREFIX + "uptime_s", round(snapshot.uptime, 1), None)]
    for s in snapshot.sinks:
        tags = {"sink": s.name}
        out += [
            (PREFIX + "buffered", s.buffered, tags),
            (PREFIX + "delivered", s.delivered, tags),
            (PREFIX + "rejected", s.rejected, tags),
            (PREFIX + "retries", s.retries, tags),
            (PREFIX + "upload_lag_s", round(s.upload_lag, 3), tags),
        ]
        for reason, n in sorted(s.dropped.items()):
            if n or reason == "buffer_full":
                out.append((PREFIX + "dropped", n, {"sink": s.name, "reason": reason}))
    for a in snapshot.adapters:
        out.append((PREFIX + "adapter_errors", a.errors, {"adapter": a.name, "kind": "all"}))
        for kind, n in sorted(a.error_kinds.items()):
            if n:
                out.append((PREFIX + "adapter_errors", n, {"adapter": a.name, "kind": kind}))
    return out


class SideQueue(MemoryBuffer):
    """A lane's queue of health points: a memory ring that drops its oldest quietly
    (losing an old report costs only resolution: the totals ride on the next one)."""

    def __init__(self, max_points: int = DEFAULT_MAX_WAITING) -> None:
        super().__init__(max_points, "drop_oldest")

    def _count_drops(self, n: int) -> None:
        self.dropped += n


class AgentReporter:
    """Queue a report on each chosen lane every ``interval`` seconds.

    The gateway calls :meth:`poll` from its main loop; the embedded client
    calls :meth:`start`, which runs a small thread that ticks the figures
    (for the upload lag) and polls.

    Parameters:
        pipeline: the pipeline whose lanes carry the reports.
        figures: where the counters are read.
        interval: seconds between reports.
        sinks: names of the sinks that get the reports; None: every sink.
        max_waiting: the side queue's size per sink, in points.
    """

    def __init__(self, pipeline: Any, figures: Figures, *, interval: float = DEFAULT_INTERVAL,
                 sinks: Iterable[str] | None = None,
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if interval <= 0:
            raise ValueError(f"the agent's interval must be positive, got {interval!r}")
        self.pipeline = pipeline
        self.figures = figures
        self.interval = float(interval)
        self.sinks = None if sinks is None else set(sinks)
        self.max_waiting = max_waiting
        self.reports = 0
        self._next: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.attach()

    def attach(self) -> None:
        """Give every chosen lane a side queue, and take it from the others (again
        after a reload)."""
        for lane in self.pipeline.lanes:
            if self.sinks is not None and lane.sink.name not in self.sinks:
                lane.uploader.side = None  # no longer chosen: its reports go
            elif lane.uploader.side is None:
                lane.uploader.side = SideQueue(self.max_waiting)

    def report(self) -> int:
        """Queue one report now; returns how many points it has."""
        try:
            n = self.pipeline.emit_side(readings(self.figures.snapshot()))
        except Exception as exc:  # a report must never take the gateway down
            log.warning("the agent's health report failed: %s", exc)
            return 0
        self.reports += 1
        return int(n)

    def poll(self, now: float) -> bool:
        """Report if one is due at monotonic time ``now`` (the first one an
        ``interval`` after the first poll); True when it did."""
        if self._next is None:
            self._next = now + self.interval
            return False
        if now < self._next:
            return False
        # Steps of the interval, not "now + interval": reports stay on a grid,
        # and a main loop that stalled does not send a burst to catch up.
        while self._next <= now:
            self._next += self.interval
        self.report()
        return True

    # The embedded client's thread ------------------------------------------------
    def start(self, tick: float = 1.0) -> None:
        import time

        def run() -> None:
            while not self._stop.wait(tick):
                self.figures.tick()
                self.poll(time.monotonic())

        self._thread = threading.Thread(target=run, name="plexus-agent", daemon=True)
        self._thread.start()

    def stop(self, final_report: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if final_report:
            self.figures.tick()
            self.report()
