"""Where timestamps come from, and when to trust them (the rules are in docs/time.md).

A point sent without a timestamp is stamped by the pipeline. Boards without a
real-time clock boot with the system clock in 1970 (or at the last shutdown's
time), so the :class:`Clock` decides, off the hot path, which timeline stamps:

- ``trusted``: the system clock, as ``time.time_ns()`` (the ordinary case,
  and exactly as cheap as stamping without a clock check);
- ``reference``: the system clock is not trusted, but a trustworthy time is
  known (the platform's, a GPS's, or the system clock's own from before it
  went wrong): stamps are the monotonic clock plus that reference's offset;
- ``unknown``: nothing trustworthy yet. Points are *held* before the buffers,
  with the monotonic time they were taken, and stamped and released as soon
  as a trustworthy time arrives: in the timeline known then, at the time
  they were taken.

The system clock is trusted when it is not before the build date
(:data:`BUILD_DATE_S`, or ``not_before``), does not disagree with a
reference by more than ``tolerance`` unless the kernel says it is
synchronized, and (``require_sync``) is synchronized or confirmed by a
reference. A reference is an interval of possible offsets between the
monotonic clock and true time; observations of the same kind are
intersected, widened as they age by the monotonic clock's possible drift,
and the narrowest kind wins.

A step of the system clock (network time arriving, a correction) is seen as
a change of ``wall - monotonic`` between two checks, logged once and counted.
Points already stamped keep their stamps; explicit timestamps are never
touched.

The monotonic clock is ``CLOCK_BOOTTIME`` where it exists (it keeps counting
through a suspend), else ``time.monotonic_ns``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Protocol

from plexus.buildinfo import BUILD_DATE
from plexus.point import Point

log = logging.getLogger(__name__)

__all__ = [
    "BUILD_DATE",
    "BUILD_DATE_S",
    "Clock",
    "ManualTime",
    "SystemTime",
    "TimeSource",
    "TimeUnknown",
    "WALL_CLOCK",
]

#: The build date as Unix seconds (midnight UTC).
BUILD_DATE_S = datetime.fromisoformat(BUILD_DATE).replace(tzinfo=timezone.utc).timestamp()
# A reference claiming a time after this is broken, not early (the year 2200).
_LATEST_PLAUSIBLE_NS = 7_258_118_400 * 10**9
# How far the monotonic clock may drift from true time, per second (crystals are
# 20-50 ppm; NTP slews at most 500 ppm, but then the system clock is trusted).
DRIFT_PER_S = 100e-6
# Reference kinds, as named in status and logs.
KINDS = {
    "http-date": "the platform's time (HTTP Date header)",
    "device-link": "the platform's time (device link)",
    "gps": "GPS time (NMEA)",
    "mavlink": "the autopilot's GPS time (MAVLink SYSTEM_TIME)",
    "system": "the system clock's last trusted time",
}
_HOLD_CHUNK = 1000
_E9 = 1_000_000_000
# How far this computer's system clock is behind the trusted time, as the last
# Clock on the real system clock found it; None: unknown (no trustworthy time).
_system_clock_behind_ns: int | None = 0


def system_clock_behind_s() -> float | None:
    """Seconds to add to ``time.time()`` to get the trusted time (0 while the system
    clock is trusted), or None while no trustworthy time is known. Used to judge
    explicit timestamps "in the future" against the right clock."""
    behind = _system_clock_behind_ns
    return None if behind is None else behind / _E9


class TimeUnknown(Exception):
    """Raised by the stamping function while no trustworthy time is known (the
    pipeline then keeps the point waiting; it never reaches the caller)."""


def _time_unknown() -> int:
    raise TimeUnknown


class TimeSource(Protocol):
    """The clocks a :class:`Clock` reads; tests inject their own (:class:`ManualTime`)."""

    def wall_ns(self) -> int:
        """The system clock, Unix nanoseconds."""

    def mono_ns(self) -> int:
        """A monotonic clock, nanoseconds from an arbitrary start."""

    def synchronized(self) -> bool | None:
        """True when the OS says the system clock is synchronized (NTP); None: unknown."""


def _monotonic_clock() -> Callable[[], int]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic_ns

    def boottime_ns() -> int:
        return time.clock_gettime_ns(boottime)

    return boottime_ns


class SystemTime:
    """This computer's clocks: ``time.time_ns``, ``CLOCK_BOOTTIME``, and the kernel's sync flag.

    ``synchronized`` asks Linux's ``adjtimex`` (what ``timedatectl`` shows as
    "System clock synchronized"): chrony, ntpd and systemd-timesyncd clear
    the kernel's "unsynchronized" flag once they have set the clock, and the
    kernel sets it again after about 9 hours without an update or when the
    clock is set by hand. Elsewhere it answers None (unknown).
    """

    wall_ns = staticmethod(time.time_ns)
    mono_ns = staticmethod(_monotonic_clock())

    def __init__(self) -> None:
        self._adjtimex: Any = None
        self._buf: Any = None

    def synchronized(self) -> bool | None:
        if not sys.platform.startswith("linux"):
            return None
        if self._adjtimex is None:
            try:
                import ctypes  # imported here: only a clock in doubt needs it

                libc = ctypes.CDLL(None, use_errno=True)
                self._adjtimex = libc.adjtimex
                # struct timex is about 200 bytes; zeroed, "modes" 0 asks without changing.
                self._buf = ctypes.create_string_buffer(512)
            except (OSError, AttributeError):
                self._adjtimex = False
        if not self._adjtimex:
            return None
        state = self._adjtimex(self._buf)
        if state < 0:
            return None
        return state != 5  # TIME_ERROR: the kernel's STA_UNSYNC flag (or worse)


class ManualTime:
    """A :class:`TimeSource` set by hand, for tests (and the benchmark).

    Parameters:
        wall_s: what the system clock says now, in Unix seconds.
        running: both clocks advance with the real monotonic clock; False:
            they move only by :meth:`advance`.
        synchronized: what the kernel's sync flag says (None: unknown).
    """

    def __init__(self, wall_s: float, *, running: bool = True,
                 synchronized: bool | None = None) -> None:
        self._running = running
        self._base = time.monotonic_ns() if running else 0
        self._mono = 1_000 * _E9  # an arbitrary start, like a board up for 1000 s
        self._wall = int(wall_s * _E9)
        self.synced = synchronized

    def _elapsed(self) -> int:
        return time.monotonic_ns() - self._base if self._running else 0

    def wall_ns(self) -> int:
        return self._wall + self._elapsed()

    def mono_ns(self) -> int:
        return self._mono + self._elapsed()

    def synchronized(self) -> bool | None:
        return self.synced

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on both clocks."""
        self._wall += int(seconds * _E9)
        self._mono += int(seconds * _E9)

    def set_wall(self, wall_s: float) -> None:
        """Step the system clock to ``wall_s`` (network time arriving, a correction)."""
        self._wall = int(wall_s * _E9) - self._elapsed()


class _Interval:
    """Possible offsets ``true time - monotonic``, as known at monotonic time ``at``."""

    __slots__ = ("lo", "hi", "at")

    def __init__(self, lo: int, hi: int, at: int) -> None:
        self.lo, self.hi, self.at = lo, hi, at

    def aged(self, now: int) -> _Interval:
        slack = int(max(0, now - self.at) * DRIFT_PER_S)
        return _Interval(self.lo - slack, self.hi + slack, now)

    @property
    def width(self) -> int:
        return self.hi - self.lo

    @property
    def mid(self) -> int:
        return (self.lo + self.hi) // 2


HeldPoint = tuple[str, Any, int, "dict[str, str] | None"]  # the third item: monotonic ns


class Clock:
    """Decides how points without a timestamp are stamped; holds them while no time is known.

    Parameters:
        source: the clocks to read; default :class:`SystemTime`.
        not_before: Unix seconds; a system clock earlier than this is not
            trusted. Default: the build date (:data:`BUILD_DATE_S`).
        require_sync: trust the system clock only while the kernel says it
            is synchronized or a reference agrees with it (boards with
            fake-hwclock, which restores the last shutdown's time).
        tolerance: seconds a reference may disagree with the system clock
            before the reference wins (unless the kernel says the system
            clock is synchronized).
        step_threshold: a change of ``wall - monotonic`` larger than this
            between two checks (seconds) is a step: logged and counted.
        hold_max_points: the most points held while the time is unknown; the
            oldest are dropped (counted) beyond it.
        check_interval: seconds between checks of the system clock.
        platform_time: use the platform's time (HTTP Date, device link) as a
            reference; GPS references are enabled per adapter.

    Raises:
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        source: TimeSource | None = None,
        *,
        not_before: float | None = None,
        require_sync: bool = False,
        tolerance: float = 2.0,
        step_threshold: float = 0.5,
        hold_max_points: int = 100_000,
        check_interval: float = 0.5,
        platform_time: bool = True,
    ) -> None:
        if hold_max_points < 1:
            raise ValueError("hold_max_points must be at least 1")
        if tolerance < 0 or step_threshold <= 0 or check_interval <= 0:
            raise ValueError("tolerance, step_threshold and check_interval must be positive")
        self.source: TimeSource = source if source is not None else SystemTime()
        self.mono_ns: Callable[[], int] = self.source.mono_ns
        floor = BUILD_DATE_S if not_before is None else max(not_before, 0.0)
        self.not_before_ns = int(floor * _E9)
        self.require_sync = require_sync
        self.platform_time = platform_time
        self.hold_max_points = hold_max_points
        self.check_interval = check_interval
        self._tolerance = int(tolerance * _E9)
        self._step = int(step_threshold * _E9)

        self._lock = threading.Lock()
        self._refs: dict[str, _Interval] = {}
        self._held: deque[HeldPoint] = deque()
        self.state = "starting"  # then "trusted" | "reference" | "unknown"
        self.basis: str | None = None  # "system", or the reference kind stamping
        self._offset: int | None = None  # true time - monotonic, as stamps use it
        self._wall_offset: int | None = None  # wall - monotonic at the last check
        self._wall_plausible = True
        self._disagreement_warned: str | None = None
        self._publish: Callable[[Callable[[], int]], None] | None = None
        self._deliver: Callable[[list[Point]], None] | None = None
        self._probes: list[Callable[[], None]] = []
        self._probe_thread: threading.Thread | None = None
        self._next_probe = 0
        self._probe_delay = 1.0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._hold_overflowing = False
        self._rejected_warned: set[str] = set()

        # Counters (status, metrics)
        self.steps = 0
        self.last_step_s: float | None = None
        self.held_total = 0  # points ever held
        self.released = 0  # held points stamped and released to the sinks
        self.dropped = 0  # held points dropped: the bound, or shutdown with no time
        self.references: dict[str, int] = {}
        self.rejected_references = 0
        self._evaluate()

    # Wiring --------------------------------------------------------------
    def bind(self, publish: Callable[[Callable[[], int]], None],
             deliver: Callable[[list[Point]], None]) -> None:
        """Connect a pipeline: ``publish`` receives the stamping function (Unix
        nanoseconds; it raises :class:`TimeUnknown` while the time is unknown),
        ``deliver`` the held points once stamped."""
        self._publish = publish
        self._deliver = deliver
        publish(self._stamper())

    def attach(self, peer: Any) -> None:
        """Offer this clock to a sink (or anything) that can tell time: its
        ``attach_clock(clock)`` is called, unless platform time is off."""
        attach = getattr(peer, "attach_clock", None)
        if attach is not None and self.platform_time:
            attach(self)

    def add_probe(self, probe: Callable[[], None]) -> None:
        """``probe()`` asks a peer for its time (and reports it with :meth:`observe`);
        it is called, with backoff, only while no trustworthy time is known."""
        self._probes.append(probe)

    def start(self) -> None:
        """Check the system clock every ``check_interval`` in a daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="plexus-clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking; held points are released if the time is known, else dropped."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self.check(final=True)
        if isinstance(self.source, SystemTime):
            global _system_clock_behind_ns
            _system_clock_behind_ns = 0

    # What adapters and sinks use -------------------------------------------
    def now(self) -> float | None:
        """Unix seconds in the trusted timeline, or None while the time is unknown."""
        offset = self._offset
        if offset is None:
            return None
        if self.state == "trusted":
            return self.source.wall_ns() / _E9
        return (self.source.mono_ns() + offset) / _E9

    def from_wall(self, seconds: float) -> float | None:
        """A reading of the system clock (a kernel timestamp) in the trusted timeline."""
        if self.state == "trusted":
            return seconds
        offset, wall_offset = self._offset, self._wall_offset
        if offset is None or wall_offset is None:
            return None
        return seconds + (offset - wall_offset) / _E9

    def observe(self, kind: str, unix_ns: int, earliest_mono_ns: int, latest_mono_ns: int,
                resolution_ns: int = 0) -> bool:
        """Report a reference time: true time was ``unix_ns`` (truncated down by up to
        ``resolution_ns``) at some monotonic instant between ``earliest_mono_ns`` and
        ``latest_mono_ns``. Returns False when the time is implausible (ignored).

        Kinds: ``http-date``, ``device-link``, ``gps``, ``mavlink`` (see :data:`KINDS`).
        """
        if not self.not_before_ns <= unix_ns <= _LATEST_PLAUSIBLE_NS:
            self.rejected_references += 1
            if kind not in self._rejected_warned:
                self._rejected_warned.add(kind)
                log.warning("ignoring %s: it says %s, before %s (a receiver without a fix, "
                            "or a GPS week rollover?)", KINDS.get(kind, kind),
                            _iso(unix_ns), _iso(self.not_before_ns))
            return False
        interval = _Interval(unix_ns - latest_mono_ns,
                             unix_ns + resolution_ns - earliest_mono_ns, latest_mono_ns)
        with self._lock:
            self.references[kind] = self.references.get(kind, 0) + 1
            old = self._refs.get(kind)
            if old is not None:
                old = old.aged(latest_mono_ns)
                lo, hi = max(old.lo, interval.lo), min(old.hi, interval.hi)
                if lo <= hi:
                    interval = _Interval(lo, hi, latest_mono_ns)
                else:  # that peer's clock stepped (or was wrong before): start over from it
                    # Debug only: servers behind a load balancer differ by milliseconds.
                    log.debug("%s moved by %s; starting over from its latest time",
                              KINDS.get(kind, kind), _span((interval.mid - old.mid) / _E9))
            self._refs[kind] = interval
            settled = self.state == "trusted" and self._disagreement_warned is None
        if not settled:
            self._wake.set()  # unknown, or stamping from a reference: act on it now
        return True

    # Status ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What the status view and metrics show."""
        wall_offset, offset = self._wall_offset, self._offset
        uncertainty = None
        if self.state == "reference" and self.basis in self._refs:
            aged = self._refs[self.basis].aged(self.source.mono_ns())
            uncertainty = round(aged.width / 2 / _E9, 3)
        return {
            "state": self.state,
            "basis": self.basis,
            "uncertainty_s": uncertainty,
            "stamps_minus_system_clock_s": None if offset is None or wall_offset is None
            else round((offset - wall_offset) / _E9, 3),
            "steps": self.steps,
            "last_step_s": self.last_step_s,
            "held": len(self._held),
            "held_total": self.held_total,
            "released": self.released,
            "dropped": self.dropped,
            "references": dict(self.references),
            "rejected_references": self.rejected_references,
        }

    # Holding ---------------------------------------------------------------
    def hold(self, points: Iterable[tuple[str, Any, dict[str, str] | None]]) -> list[Point]:
        """Hold ``(metric, value, tags)`` readings taken now while the time is unknown.

        Returns them stamped instead (to be buffered by the caller) when the
        time became known in the meantime.
        """
        mono = self.source.mono_ns()
        with self._lock:
            offset = self._offset
            if offset is not None:
                ts = (mono + offset) // 1_000_000
                return [(metric, value, ts, tags) for metric, value, tags in points]
            held = self._held
            for metric, value, tags in points:
                if len(held) >= self.hold_max_points:
                    held.popleft()
                    self.dropped += 1
                    if not self._hold_overflowing:
                        self._hold_overflowing = True
                        log.warning("%d points wait for a trustworthy time (clock."
                                    "hold_max_points): dropping the oldest until it arrives",
                                    self.hold_max_points)
                held.append((metric, value, mono, tags))
                self.held_total += 1
        return []

    # Checking --------------------------------------------------------------
    def check(self, final: bool = False) -> None:
        """Look at the system clock and the references once; release held points when
        the time became known. The thread calls this every ``check_interval``."""
        with self._lock:
            self._evaluate()
            released = self._take_held(final)
        if released:
            self._release(released)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.check_interval)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self.check()
                self._maybe_probe()
            except Exception:  # the clock thread must outlive a bug in a check
                log.exception("checking the clock failed; checking again in %.1f s",
                              self.check_interval)

    def _maybe_probe(self) -> None:
        if self._offset is not None or not self._probes:
            return
        now = self.source.mono_ns()
        if now < self._next_probe or (self._probe_thread and self._probe_thread.is_alive()):
            return
        self._next_probe = now + int(self._probe_delay * _E9)
        self._probe_delay = min(self._probe_delay * 2, 60.0)
        self._probe_thread = threading.Thread(target=self._probe, name="plexus-clock-probe",
                                              daemon=True)
        self._probe_thread.start()

    def _probe(self) -> None:
        for probe in list(self._probes):
            try:
                probe()
            except Exception as exc:  # an unreachable platform is the normal case here
                log.debug("time probe failed: %s", exc)

    def _sample(self) -> tuple[int, int]:
        """(monotonic, wall) read as close together as possible."""
        mono, wall = self.source.mono_ns, self.source.wall_ns
        best: tuple[int, int, int] | None = None
        for _ in range(3):
            m1 = mono()
            w = wall()
            m2 = mono()
            if best is None or m2 - m1 < best[0]:
                best = (m2 - m1, (m1 + m2) // 2, w)
            if m2 - m1 < 1_000_000:
                break
        assert best is not None
        return best[1], best[2]

    def _best_reference(self, now: int) -> tuple[str, _Interval] | None:
        best: tuple[str, _Interval] | None = None
        for kind, interval in self._refs.items():
            if kind == "system":
                continue
            aged = interval.aged(now)
            if best is None or aged.width < best[1].width:
                best = (kind, aged)
        return best

    def _evaluate(self) -> None:
        """Decide the state from a fresh sample. Holds the lock (or runs in __init__)."""
        mono, wall = self._sample()
        wall_offset = wall - mono
        plausible = wall >= self.not_before_ns
        previous = self._wall_offset
        if previous is not None and abs(wall_offset - previous) > self._step:
            self._record_step(wall_offset - previous, wall, self._wall_plausible, plausible)
        self._wall_offset = wall_offset
        self._wall_plausible = plausible

        best = self._best_reference(mono)
        trusted = False
        if plausible:
            if best is None or \
                    best[1].lo - self._tolerance <= wall_offset <= best[1].hi + self._tolerance:
                self._disagreement_warned = None
                # With require_sync, a reference that agrees confirms the clock.
                trusted = not self.require_sync or best is not None or \
                    bool(self.source.synchronized())
            elif self.source.synchronized():
                trusted = True
                self._warn_disagreement(best, wall_offset, synchronized=True)
            else:
                self._warn_disagreement(best, wall_offset, synchronized=False)
        if trusted:
            self._refs["system"] = _Interval(wall_offset, wall_offset, mono)
            self._set_state("trusted", "system", wall_offset, wall)
        elif best is not None:
            self._set_state("reference", best[0], best[1].mid, wall)
        elif "system" in self._refs:
            self._set_state("reference", "system", self._refs["system"].aged(mono).mid, wall)
        else:
            self._set_state("unknown", None, None, wall)

    def _set_state(self, state: str, basis: str | None, offset: int | None, wall: int) -> None:
        before, before_basis, before_offset = self.state, self.basis, self._offset
        self._offset = offset
        changed = state != before or basis != before_basis
        if not changed and not (state == "reference" and offset != before_offset):
            return
        self.state, self.basis = state, basis
        if self._publish is not None:
            self._publish(self._stamper())
        if isinstance(self.source, SystemTime):
            global _system_clock_behind_ns
            _system_clock_behind_ns = 0 if state == "trusted" else None if offset is None \
                else offset - (self._wall_offset or 0)
        if not changed:
            return  # a reference refined: republished, nothing to say
        if state == "unknown":
            log.warning(
                "the system clock says %s, before %s: it cannot be right (a board without a "
                "real-time clock, before network time). Points without a timestamp wait, up to "
                "%d, until a trustworthy time arrives: network time, the platform's answers, or "
                "a GPS marked time_source (docs/time.md)", _iso(wall), _iso(self.not_before_ns),
                self.hold_max_points)
        elif state == "trusted":
            if before != "starting":
                log.info("the system clock (%s) is trustworthy now; points are stamped from it",
                         _iso(wall))
        elif basis == "system":
            log.warning("the system clock says %s, before %s: stamping from the monotonic clock "
                        "and the time the system clock showed when it was last trusted",
                        _iso(wall), _iso(self.not_before_ns))
        else:
            log.info("time is known from %s: %s; points are stamped from the monotonic clock "
                     "and that time (the system clock says %s)", KINDS.get(basis or "", basis),
                     _iso(self.source.mono_ns() + (offset or 0)), _iso(wall))

    def _warn_disagreement(self, best: tuple[str, _Interval], wall_offset: int,
                           synchronized: bool) -> None:
        kind, interval = best
        if self._disagreement_warned == kind:
            return
        self._disagreement_warned = kind
        gap = (wall_offset - interval.mid) / _E9
        if synchronized:
            log.warning("the system clock is %s %s %s, but the kernel says it is synchronized: "
                        "keeping the system clock", _span(abs(gap)),
                        "ahead of" if gap > 0 else "behind", KINDS.get(kind, kind))
        else:
            log.warning("the system clock is %s %s %s (tolerance %s) and not synchronized: "
                        "stamping from %s until they agree (docs/time.md)", _span(abs(gap)),
                        "ahead of" if gap > 0 else "behind", KINDS.get(kind, kind),
                        _span(self._tolerance / _E9), KINDS.get(kind, kind))

    def _record_step(self, jump: int, wall: int, was_plausible: bool, plausible: bool) -> None:
        self.steps += 1
        self.last_step_s = round(jump / _E9, 3)
        direction = "forward" if jump > 0 else "back"
        if was_plausible and plausible:
            note = "points already stamped keep their time"
        elif plausible:
            note = "it is plausible now"
        else:
            note = "it is implausible now"
        log.warning("the system clock stepped %s by %s, to %s (%s)", direction,
                    _span(abs(jump) / _E9), _iso(wall), note)

    def _stamper(self) -> Callable[[], int]:
        offset = self._offset
        if self.state == "trusted":
            return self.source.wall_ns
        if offset is None:
            return _time_unknown
        mono = self.source.mono_ns

        def reference_ns() -> int:
            return mono() + offset

        return reference_ns

    def _take_held(self, final: bool) -> list[Point]:
        """Stamp and take the held points once the time is known. Holds the lock."""
        held = self._held
        if not held:
            return []
        offset = self._offset
        if offset is None:
            if final:
                self.dropped += len(held)
                log.warning("%d points taken while no trustworthy time was known are dropped at "
                            "shutdown: nothing arrived to stamp them with (docs/time.md)",
                            len(held))
                held.clear()
            return []
        points = [(metric, value, (mono + offset) // 1_000_000, tags)
                  for metric, value, mono, tags in held]
        held.clear()
        self._hold_overflowing = False
        log.info("%d points held until the time was known are stamped (%s .. %s) and released",
                 len(points), _iso(points[0][2] * 1_000_000), _iso(points[-1][2] * 1_000_000))
        return points

    def _release(self, points: list[Point]) -> None:
        deliver = self._deliver
        if deliver is None:
            self.dropped += len(points)
            return
        for start in range(0, len(points), _HOLD_CHUNK):
            chunk = points[start:start + _HOLD_CHUNK]
            deliver(chunk)
            self.released += len(chunk)


class _WallClock:
    """The clock of an adapter started without a pipeline's (tests): the system clock."""

    state = "trusted"

    def now(self) -> float:
        return time.time()

    def from_wall(self, seconds: float) -> float:
        return seconds

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def observe(self, kind: str, unix_ns: int, earliest_mono_ns: int, latest_mono_ns: int,
                resolution_ns: int = 0) -> bool:
        return False


#: What an adapter uses when its context offers no clock.
WALL_CLOCK: Any = _WallClock()


def _iso(ns: int) -> str:
    seconds = ns / _E9
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f} s"


def _span(seconds: float) -> str:
    """A duration as people read it: 0.8 s, 42 s, 3 min 5 s, 2 d 4 h, 56 years."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds < 365 * 86400:
        return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"
    return f"{seconds / (365.25 * 86400):.1f} years"
