"""CAN source: read frames from any python-can interface (or replay a capture
file) and decode them with one or more CAN databases (cantools).

Frame to metrics
    Each decoded signal becomes one point named ``{prefix}.{message}.{signal}``
    with the message and signal names exactly as the database spells them
    (``can.BATTERY_VT.MODULE_VOLTAGE_07``); an empty ``prefix`` gives
    ``{message}.{signal}``. Signals with choices (enums) are sent as the
    choice's name, a string (``"Enabled"``); a raw value without a choice
    stays a number. Multiplexed messages yield only the signals that the
    frame's multiplexer value selects, plus the multiplexer signal itself.

Units (``units``)
    ``tag`` (the default) adds the tag ``unit=<unit>`` to points of signals
    that have a unit; ``name`` appends ``_<unit>`` to the metric instead, with
    ``%`` spelled ``pct``, ``°`` spelled ``deg`` and every other run of
    characters outside ``[A-Za-z0-9]`` turned into one ``_`` (``km/h`` gives
    ``..._km_h``, ``°C`` gives ``..._degC``); ``none`` ignores units.
    The tag keeps metric names stable when a DBC's unit spelling changes, so
    it is the default.

Frames no database knows (``raw``)
    ``hex`` (the default) emits ``{prefix}.raw.0x{id}`` with the payload as an
    upper-case hex string without separators (``"F0010203"``; ``""`` for an
    empty payload). The id is upper-case hex, 3 digits for an 11-bit id
    (``can.raw.0x1F3``) and 8 for a 29-bit one (``can.raw.0x18EBFF00``).
    ``drop`` ignores them (they are still counted in ``unknown_frames``).
    Remote frames carry no data and are counted, never emitted.

Bad frames
    A frame whose length does not fit its message (shorter, or longer when
    ``strict_dlc`` is on) or whose multiplexer value the database does not
    define is counted in ``decode_errors``, logged at a limited rate, and
    skipped; the adapter carries on. Error frames are counted in
    ``error_frames``, and those with the bus-off class bit (SocketCAN's
    ``CAN_ERR_BUSOFF``) also in ``bus_off``. A driver error while reading
    closes the bus and reopens it with backoff (counted in ``bus_errors``).

Choosing and thinning signals
    ``signals`` is an allow list of shell-style patterns (``*``, ``?``,
    ``[...]``, case-sensitive), each matched against ``Message.Signal`` and
    against the bare signal name; empty means every signal. Messages none of
    whose signals are allowed are not decoded at all; ids no database defines
    follow ``raw`` alone (``raw: drop`` sends only the allowed signals).
    ``min_interval`` skips a signal emitted less than that many seconds ago;
    ``on_change`` skips a signal whose value equals the last one emitted, and
    ``keepalive`` sends an unchanged value again after that many seconds so a
    constant signal is not mistaken for a dead one. Intervals are measured on
    the frames' own timestamps, so a fast replay is thinned as the recording
    was, with 1% slack for the jitter of periodic frames.
    ``signal_options`` overrides these three per signal, keyed by the same
    kind of pattern (the first matching key wins).

Timestamps
    Live frames carry the time the interface received them (Unix seconds on
    SocketCAN and the virtual bus). A frame time before the year 2000 comes
    from an interface that counts from its own start; such frames get the
    receive time instead (counted in ``relative_timestamps``).
    ``timestamps: now`` always uses the receive time. The kernel stamps
    frames with the system clock; while that clock is not trusted (a board
    without a real-time clock, docs/time.md) such times are mapped to the
    trusted time, or the points wait until one is known.

Replay
    ``replay`` reads a capture (``.asc``, ``.blf``, ``.trc``, candump ``.log``
    and whatever else :class:`can.LogReader` knows) instead of opening a bus.
    ``replay_speed`` 0 replays as fast as possible, 1.0 at the recorded pace,
    2.0 twice as fast. Points are stamped with the wall clock by default
    (``replay_timestamps: now``) because a capture from last year would
    otherwise land in last year's charts, and one with timestamps relative to
    its start would land in 1970; ``recorded`` keeps the capture's times
    (relative ones are anchored at the moment the replay began). ``filters``
    apply to the replay as they would to a bus. When a replay without
    ``replay_loop`` ends, the adapter's state becomes ``finished``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Interval

from plexus.adapters.base import AdapterContext, ThreadedAdapter, describe_error, require
from plexus.errors import AdapterError, InvalidOptions, PlexusError
from plexus.optioncheck import declared_problems

__all__ = ["CanAdapter", "CanFilter", "CanOptions", "SignalOptions"]

# Frame key for the route cache: the id, with bit 31 set for a 29-bit id so an
# 11-bit and a 29-bit frame with the same number never share a route.
_EXTENDED_KEY = 0x8000_0000
# A noisy bus (or a fuzzer) can produce endless distinct ids; the cache is
# cleared when it reaches this many so it cannot grow without bound.
_ROUTE_CACHE_SIZE = 65536
# SocketCAN error class bit for bus-off (linux/can/error.h CAN_ERR_BUSOFF).
_CAN_ERR_BUSOFF = 0x40
# Frame times before 2000-01-01 cannot be Unix time: the interface counts from
# its own start (or not at all).
_MIN_UNIX_TIME = 946_684_800.0
# A frame timestamp this close to the system clock came from it (the kernel's).
_WALL_STAMP = 86_400.0
_RECV_TIMEOUT = 0.5

_SIGNAL_OPTION_KEYS = frozenset({"min_interval", "on_change", "keepalive"})
_FILTER_KEYS = frozenset({"can_id", "can_mask", "extended"})


@dataclass
class CanFilter:
    """One receive filter: a frame passes when ``id & can_mask == can_id & can_mask``."""

    can_id: Annotated[int, Interval(ge=0, le=0x1FFF_FFFF)] = field(
        metadata={"help": "identifier to match"})
    can_mask: Annotated[int, Interval(ge=0, le=0x1FFF_FFFF)] | None = field(
        default=None,
        metadata={"help": "bits of the id that must match; None: all 29 (exact id)"},
    )
    extended: bool | None = field(
        default=None,
        metadata={"help": "true: 29-bit ids only; false: 11-bit ids only; None: either"},
    )


@dataclass
class SignalOptions:
    """Per-signal thinning that overrides the adapter-wide settings."""

    min_interval: Annotated[float, Ge(0)] | None = field(
        default=None, metadata={"help": "seconds; skip the signal if emitted less than this ago"}
    )
    on_change: bool | None = field(
        default=None, metadata={"help": "only emit when the value changed"}
    )
    keepalive: Annotated[float, Ge(0)] | None = field(
        default=None, metadata={"help": "with on_change: re-send an unchanged value after this"}
    )


@dataclass
class CanOptions:
    """Options of the ``can`` adapter (see the module docstring and configs/can.yaml)."""

    interface: str = field(
        default="socketcan",
        metadata={"help": "python-can interface: socketcan, pcan, kvaser, slcan, vector, "
                  "gs_usb, virtual, ..."},
    )
    channel: str | int | None = field(
        default=None,
        metadata={"help": "interface channel: 'can0', 'PCAN_USBBUS1', 0...; None: python-can's "
                  "own configuration (~/.canrc, CAN_CHANNEL)"},
    )
    bitrate: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={"help": "bit rate, bit/s; None: leave the interface as configured"},
    )
    fd: bool = field(default=False, metadata={"help": "open the bus in CAN FD mode"})
    data_bitrate: Annotated[int, Ge(1)] | None = field(
        default=None, metadata={"help": "CAN FD data phase bit rate, bit/s"}
    )
    bus_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "further keyword arguments for can.Bus(), passed as they are"},
    )
    dbc: list[str] = field(
        default_factory=list,
        metadata={"help": "CAN databases (.dbc, .kcd, .arxml, .sym); the first that defines "
                  "an id wins; relative paths are resolved against the rig file's folder",
                  "path": True},
    )
    prefix: str = field(
        default="can", metadata={"help": "first part of every metric name; '' for none"}
    )
    units: Literal["tag", "name", "none"] = field(
        default="tag",
        metadata={"help": "signal units: 'tag' adds unit=<unit>; 'name' appends _<unit> to the "
                  "metric; 'none' ignores them"},
    )
    raw: Literal["hex", "drop"] = field(
        default="hex",
        metadata={"help": "frames no database knows: 'hex' emits {prefix}.raw.0x{ID} with the "
                  "payload as hex; 'drop' ignores them"},
    )
    strict_dlc: bool = field(
        default=True,
        metadata={"help": "count frames longer than their message as decode errors; false "
                  "ignores the extra bytes (ECUs that pad every frame to 8 bytes)"},
    )
    filters: list[CanFilter] = field(
        default_factory=list,
        metadata={"help": "receive filters {can_id, can_mask, extended}; in the kernel or "
                  "hardware where the interface supports it; empty: every frame"},
    )
    signals: list[str] = field(
        default_factory=list,
        metadata={"help": "allow list of patterns matched against 'Message.Signal' and the bare "
                  "signal name ('*', '?' wildcards); empty: every signal"},
    )
    min_interval: Annotated[float, Ge(0)] | None = field(
        default=None,
        metadata={"help": "seconds; skip a signal emitted less than this long ago"},
    )
    on_change: bool = field(
        default=False, metadata={"help": "only emit a signal when its value changed"}
    )
    keepalive: Annotated[float, Ge(0)] | None = field(
        default=None,
        metadata={"help": "with on_change: re-send an unchanged value after this many seconds"},
    )
    signal_options: dict[str, SignalOptions] = field(
        default_factory=dict,
        metadata={"help": "per-signal {min_interval, on_change, keepalive}, keyed by a pattern "
                  "like 'signals'; the first matching key wins"},
    )
    timestamps: Literal["frame", "now"] = field(
        default="frame",
        metadata={"help": "live frames: 'frame' uses the interface's receive time, 'now' the "
                  "wall clock when the frame is read"},
    )
    replay: str | None = field(
        default=None,
        metadata={"help": "replay this capture (.asc, .blf, .trc, candump .log...) instead of "
                  "opening a bus (relative to the rig file's folder)", "path": True},
    )
    replay_speed: Annotated[float, Ge(0)] = field(
        default=0.0,
        metadata={"help": "0: as fast as possible; 1.0: recorded pace; 2.0: twice as fast"},
    )
    replay_loop: bool = field(
        default=False, metadata={"help": "start the capture again when it ends"}
    )
    replay_timestamps: Literal["recorded", "now"] = field(
        default="now",
        metadata={"help": "'now': stamp replayed points with the wall clock; 'recorded': with "
                  "the capture's times"},
    )

    def __post_init__(self) -> None:
        # Declared limits were checked by the rig loader, each at its line; this holds
        # options built in Python to them too. Every problem is reported at once.
        if isinstance(self.dbc, str):
            self.dbc = [self.dbc]
        if isinstance(self.signals, str):
            self.signals = [self.signals]
        problems = declared_problems(self)
        filters = []
        for index, item in enumerate(self.filters):
            flt, found = _filter_option(index, item)
            filters.append(flt)
            problems += found
        self.filters = filters
        signal_options = {}
        for key, value in self.signal_options.items():
            option, found = _signal_option(key, value)
            signal_options[key] = option
            problems += found
        self.signal_options = signal_options
        if problems:
            raise InvalidOptions(problems)


def _filter_option(index: int, item: Any) -> tuple[Any, list[tuple[str, str]]]:
    where = f"filters[{index}]"
    if isinstance(item, CanFilter):
        flt = item
    elif isinstance(item, dict):
        unknown = set(item) - _FILTER_KEYS
        if unknown or "can_id" not in item:
            return item, [(where, f"must be {{can_id, can_mask, extended}}, got {item!r}")]
        flt = CanFilter(**item)
    else:
        return item, [(where, f"must be a mapping, got {item!r}")]
    return flt, [(f"{where}.{key}", message) for key, message in declared_problems(flt)]


def _signal_option(key: str, value: Any) -> tuple[Any, list[tuple[str, str]]]:
    where = f"signal_options[{key!r}]"
    if isinstance(value, SignalOptions):
        option = value
    elif not isinstance(value, dict) or set(value) - _SIGNAL_OPTION_KEYS:
        return value, [(where, f"must be a mapping of {sorted(_SIGNAL_OPTION_KEYS)}, "
                               f"got {value!r}")]
    else:
        option = SignalOptions(**value)
    return option, [(f"{where}.{name}", message) for name, message in declared_problems(option)]


def _unit_suffix(unit: str) -> str:
    text = unit.replace("%", "pct").replace("°", "deg")
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def _matches(patterns: list[str], qualified: str, bare: str) -> bool:
    return any(
        fnmatch.fnmatchcase(qualified, p) or fnmatch.fnmatchcase(bare, p) for p in patterns
    )


class _SignalPlan:
    """What to do with one signal of one message; holds its thinning state."""

    __slots__ = ("metric", "tags", "thin", "min_interval", "on_change", "keepalive",
                 "last_t", "last_value")

    def __init__(self, metric: str, tags: dict[str, str] | None, min_interval: float | None,
                 on_change: bool, keepalive: float | None) -> None:
        self.metric = metric
        self.tags = tags
        # 1% slack: a periodic signal's jitter (or float rounding of its
        # timestamps) must not make every other due value look early.
        self.min_interval = (min_interval or 0.0) * 0.99
        self.on_change = on_change
        self.keepalive = None if keepalive is None else keepalive * 0.99
        self.thin = bool(min_interval) or on_change
        self.last_t: float | None = None
        self.last_value: Any = None

    def due(self, value: Any, t: float) -> bool:
        last_t = self.last_t
        # A clock that went backwards (a looped replay, a restarted interface)
        # restarts the thinning instead of muting the signal.
        if last_t is not None and t >= last_t:
            elapsed = t - last_t
            if elapsed < self.min_interval:
                return False
            if self.on_change and value == self.last_value and (
                self.keepalive is None or elapsed < self.keepalive
            ):
                return False
        self.last_t = t
        self.last_value = value
        return True


class _Route:
    """How frames of one id are handled: decoded, sent raw, or ignored."""

    __slots__ = ("message", "plans", "raw_metric", "unknown")

    def __init__(self, message: Any = None, plans: dict[str, _SignalPlan] | None = None,
                 raw_metric: str | None = None, unknown: bool = False) -> None:
        self.message = message
        self.plans = plans
        self.raw_metric = raw_metric
        self.unknown = unknown


_IGNORE = _Route()


class CanAdapter(ThreadedAdapter):
    """Reads CAN frames from a python-can bus, or replays a capture, and emits
    one point per decoded signal (see the module docstring for the rules).

    Parameters:
        options: a :class:`CanOptions`.
        name: the adapter's name in logs and status.

    Raises (from :meth:`start`):
        AdapterError: python-can or cantools is not installed (the message
            names the ``can`` extra), the interface is unknown, a database
            or the replay file is missing or unreadable.

    Health extras: ``frames`` (all frames read), ``decoded`` (frames decoded),
    ``unknown_frames`` and ``unknown_ids`` (frames, and distinct ids, that no
    database defines), ``decode_errors``, ``error_frames``, ``bus_off``,
    ``bus_errors`` (driver errors while reading), ``remote_frames``,
    ``thinned`` (signal values skipped by min_interval/on_change),
    ``relative_timestamps`` and, when replaying, ``replay_passes``.
    """

    type_name: ClassVar[str] = "can"
    extra: ClassVar[str | None] = "can"
    requires: ClassVar[tuple[str, ...]] = ("can", "cantools")
    Options: ClassVar[type] = CanOptions

    def __init__(self, options: CanOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: CanOptions = options
        self._can: Any = None
        self._named_value_type: Any = None
        self._databases: list[Any] = []
        self._routes: dict[int, _Route] = {}
        self._unknown_seen: set[int] = set()
        self._bus: Any = None
        self._reader: Any = None
        self._link_lock = threading.Lock()
        self._finished = False
        self._allow_excess = not options.strict_dlc
        self._raw_head = f"{options.prefix}.raw." if options.prefix else "raw."
        self.frames = 0
        self.decoded = 0
        self.unknown_frames = 0
        self.decode_errors = 0
        self.error_frames = 0
        self.bus_off = 0
        self.bus_errors = 0
        self.remote_frames = 0
        self.thinned = 0
        self.relative_timestamps = 0
        self.replay_passes = 0
        # Metric patterns whose thinning a live stream (start_stream) lifts.
        self._stream_patterns: tuple[str, ...] = ()

    # Lifecycle -----------------------------------------------------------
    def start(self, ctx: AdapterContext) -> None:
        opts = self.options
        self._can = require("can", "can")
        require("cantools", "can")
        from cantools.database.namedsignalvalue import NamedSignalValue

        self._named_value_type = NamedSignalValue
        self._databases = [self._load_database(path) for path in opts.dbc]
        self._warn_unmatched_patterns()
        if opts.replay is not None:
            self._check_replay_file(opts.replay)
        elif opts.interface not in self._can.interfaces.VALID_INTERFACES:
            raise AdapterError(
                f"unknown python-can interface {opts.interface!r} (known: "
                f"{', '.join(sorted(self._can.interfaces.VALID_INTERFACES))})"
            )
        self._routes = {}
        self._finished = False
        super().start(ctx)

    def preflight(self) -> list[str]:
        opts = self.options
        try:
            self._can = require("can", "can")
            require("cantools", "can")
        except AdapterError as exc:
            return [str(exc)]
        problems = []
        for path in opts.dbc:
            try:
                self._load_database(path)
            except AdapterError as exc:
                problems.append(str(exc))
        if opts.replay is not None:
            try:
                self._check_replay_file(opts.replay)
            except AdapterError as exc:
                problems.append(str(exc))
        elif opts.interface not in self._can.interfaces.VALID_INTERFACES:
            problems.append(f"unknown python-can interface {opts.interface!r} (known: "
                            f"{', '.join(sorted(self._can.interfaces.VALID_INTERFACES))})")
        return problems

    def preflight_online(self, timeout: float) -> list[str]:
        if self.options.replay is not None or self._can is None:
            return []  # a capture touches nothing
        try:
            self.connect()
        except Exception as exc:
            return [f"cannot open CAN interface {self.options.interface!r} channel "
                    f"{self.options.channel!r}: {describe_error(exc)}"]
        self._close_link(force=True)
        return []

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        # The reader thread closes its own bus when it leaves; this catches a
        # thread that did not finish within the timeout.
        self._close_link(force=True)

    def _main(self) -> None:
        super()._main()
        if self._finished:
            self.state = "finished"

    def connect(self) -> None:
        opts = self.options
        if opts.replay is not None:
            reader = self._can.LogReader(opts.replay)
            with self._link_lock:
                self._reader = reader
            return
        kwargs: dict[str, Any] = dict(opts.bus_options)
        kwargs["interface"] = opts.interface
        if opts.channel is not None:
            kwargs["channel"] = opts.channel
        if opts.bitrate is not None:
            kwargs["bitrate"] = opts.bitrate
        if opts.fd:
            kwargs["fd"] = True
        if opts.data_bitrate is not None:
            kwargs["data_bitrate"] = opts.data_bitrate
        if opts.filters:
            kwargs["can_filters"] = [_python_can_filter(f) for f in opts.filters]
        bus = self._can.Bus(**kwargs)
        with self._link_lock:
            self._bus = bus

    def disconnect(self) -> None:
        self._close_link(force=False)

    def _close_link(self, force: bool) -> None:
        # Closing a bus or a file under the reader thread's feet makes the
        # driver raise in odd ways; unless forced, leave it to that thread.
        thread = self._thread
        if not force and thread is not None and thread.is_alive() \
                and threading.current_thread() is not thread:
            return
        with self._link_lock:
            bus, self._bus = self._bus, None
            reader, self._reader = self._reader, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as exc:  # a driver failing on close must not block shutdown
                self._log.debug("%s: bus shutdown failed: %s", self.name, exc)
        if reader is not None:
            try:
                reader.stop()
            except Exception as exc:
                self._log.debug("%s: closing the capture failed: %s", self.name, exc)

    def run_connected(self) -> None:
        if self.options.replay is not None:
            self._run_replay()
            return
        bus = self._bus
        on_frame = self._on_frame
        stopping = self.stopping
        use_now = self.options.timestamps == "now"
        can_error = self._can.CanError
        clock = self.clock
        while not stopping.is_set():
            try:
                msg = bus.recv(timeout=_RECV_TIMEOUT)
            except (can_error, OSError):
                if not stopping.is_set():
                    self.bus_errors += 1
                raise
            if msg is None:
                continue
            ts: float | None = msg.timestamp
            if use_now:
                ts = clock.now()
            elif clock.state != "trusted" and abs(msg.timestamp - time.time()) < _WALL_STAMP:
                # The kernel stamped the frame with the system clock, which is wrong now:
                # the clock maps it to the trusted time (None: the point waits for one).
                ts = clock.from_wall(msg.timestamp)
            elif msg.timestamp < _MIN_UNIX_TIME:
                self.relative_timestamps += 1
                ts = clock.now()
            on_frame(msg, ts)

    def _run_replay(self) -> None:
        opts = self.options
        while True:
            count = self._replay_pass(self._reader)
            if self.stopping.is_set():
                return
            self.replay_passes += 1
            if not opts.replay_loop or count == 0:
                self._finished = True
                self.stopping.set()
                return
            # The next pass starts at once, without the reconnect backoff.
            reader = self._can.LogReader(opts.replay)
            with self._link_lock:
                old, self._reader = self._reader, reader
            if old is not None:
                old.stop()

    def _replay_pass(self, reader: Any) -> int:
        opts = self.options
        stopping = self.stopping
        on_frame = self._on_frame
        speed = opts.replay_speed
        recorded = opts.replay_timestamps == "recorded"
        filters = [_python_can_filter(f) for f in opts.filters]
        first: float | None = None
        start_mono = time.monotonic()
        clock = self.clock
        start_wall = clock.now()  # None while no trustworthy time: each point waits for one
        count = 0
        try:
            for msg in reader:
                if stopping.is_set():
                    break
                count += 1
                if first is None:
                    first = msg.timestamp
                if speed > 0:
                    delay = start_mono + (msg.timestamp - first) / speed - time.monotonic()
                    if delay > 0 and stopping.wait(delay):
                        break
                if filters and not _passes(filters, msg):
                    continue
                ts: float | None
                if not recorded:
                    ts = clock.now()
                elif msg.timestamp >= _MIN_UNIX_TIME:
                    ts = msg.timestamp
                elif start_wall is None:
                    ts = None
                else:
                    # Timestamps relative to the start of the recording.
                    ts = start_wall + (msg.timestamp - first)
                on_frame(msg, ts)
        except Exception as exc:
            if not stopping.is_set():
                # The reader cannot go on after a line it fails to parse; the
                # rest of this pass is lost, the adapter is not.
                self.bad_input(f"capture {opts.replay!r} unreadable after {count} frames: {exc}")
        return count

    # The hot path --------------------------------------------------------
    def _on_frame(self, msg: Any, ts: float | None) -> None:
        self.frames += 1
        if msg.is_error_frame:
            self.error_frames += 1
            if msg.arbitration_id & _CAN_ERR_BUSOFF:
                self.bus_off += 1
            return
        if msg.is_remote_frame:
            self.remote_frames += 1
            return
        key = msg.arbitration_id | _EXTENDED_KEY if msg.is_extended_id else msg.arbitration_id
        route = self._routes.get(key)
        if route is None:
            route = self._route_for(key, msg)
        message = route.message
        if message is None:
            if route.unknown:
                self.unknown_frames += 1
                if route.raw_metric is not None:
                    self.emit(route.raw_metric, msg.data.hex().upper(), ts)
            return
        try:
            decoded = message.decode(msg.data, decode_choices=True, scaling=True,
                                     allow_excess=self._allow_excess)
        except Exception as exc:  # cantools raises DecodeError, ValueError, struct.error...
            self.decode_errors += 1
            self.bad_input(
                f"frame 0x{msg.arbitration_id:X} ({message.name}) "
                f"[{msg.dlc}] {msg.data.hex().upper()}: {exc}"
            )
            return
        self.decoded += 1
        plans = route.plans
        assert plans is not None
        assert self._ctx is not None
        ctx_emit = self._ctx.emit
        named = self._named_value_type
        # The thinning clock is the frame's own time (so a fast replay thins
        # as recorded); 0 means the interface gave none.
        t = msg.timestamp or time.monotonic()
        emitted = 0
        for signal_name, value in decoded.items():
            plan = plans.get(signal_name)
            if plan is None:
                continue
            if type(value) is named:
                value = value.name
            if plan.thin and not plan.due(value, t):
                self.thinned += 1
                continue
            # Adapter.emit inlined: per-point bookkeeping is done once per frame.
            try:
                ctx_emit(plan.metric, value, ts, plan.tags)
            except PlexusError as exc:
                self.bad_input(f"point {plan.metric!r} rejected: {exc}")
                continue
            emitted += 1
        if emitted:
            self.points += emitted
            self.last_point_time = time.time()

    # Routes (built once per id) ------------------------------------------
    def _route_for(self, key: int, msg: Any) -> _Route:
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        message = self._find_message(msg.arbitration_id, msg.is_extended_id)
        if message is not None:
            plans = self._plans_for(message)
            route = _Route(message, plans) if plans else _IGNORE
        else:
            if len(self._unknown_seen) < _ROUTE_CACHE_SIZE:
                self._unknown_seen.add(key)
            raw_metric = None
            if self.options.raw == "hex":
                digits = 8 if msg.is_extended_id else 3
                raw_metric = f"{self._raw_head}0x{msg.arbitration_id:0{digits}X}"
            route = _Route(raw_metric=raw_metric, unknown=True)
        self._routes[key] = route
        return route

    def _find_message(self, frame_id: int, extended: bool) -> Any:
        for db in self._databases:
            try:
                message = db.get_message_by_frame_id(frame_id)
            except KeyError:
                continue
            if bool(message.is_extended_frame) == bool(extended):
                return message
        return None

    def _plans_for(self, message: Any) -> dict[str, _SignalPlan]:
        opts = self.options
        head = f"{opts.prefix}.{message.name}" if opts.prefix else message.name
        plans: dict[str, _SignalPlan] = {}
        for signal in message.signals:
            qualified = f"{message.name}.{signal.name}"
            if opts.signals and not _matches(opts.signals, qualified, signal.name):
                continue
            metric = f"{head}.{signal.name}"
            tags: dict[str, str] | None = None
            unit = signal.unit
            if unit and opts.units == "tag":
                tags = {"unit": unit}
            elif unit and opts.units == "name":
                suffix = _unit_suffix(unit)
                if suffix:
                    metric = f"{metric}_{suffix}"
            min_interval, on_change, keepalive = opts.min_interval, opts.on_change, opts.keepalive
            for pattern, override in opts.signal_options.items():
                if _matches([pattern], qualified, signal.name):
                    if override.min_interval is not None:
                        min_interval = override.min_interval
                    if override.on_change is not None:
                        on_change = override.on_change
                    if override.keepalive is not None:
                        keepalive = override.keepalive
                    break
            if self._stream_patterns and any(fnmatch.fnmatchcase(metric, p)
                                             for p in self._stream_patterns):
                min_interval, on_change = None, False  # streamed: every value, at full rate
            plans[signal.name] = _SignalPlan(metric, tags, min_interval, on_change, keepalive)
        return plans

    # Changes at run time (remote commands) ---------------------------------
    def load_databases(self, paths: list[str]) -> list[Any]:
        """Load and check CAN databases without using them yet.

        Raises:
            AdapterError: cantools is missing, or a file is missing or not a database.
        """
        require("cantools", "can")
        return [self._load_database(path) for path in paths]

    def replace_databases(self, paths: list[str], databases: list[Any]) -> None:
        """Decode with ``databases`` (from :meth:`load_databases`) from the next frame on."""
        self._databases = databases
        self.options.dbc = list(paths)
        self._routes = {}  # rebuilt per id from the new databases
        self._warn_unmatched_patterns()

    def set_min_interval(self, seconds: float | None) -> None:
        """Thin every signal to one value per ``seconds`` (None or 0: no thinning)."""
        self.options.min_interval = seconds or None
        self._routes = {}

    def set_stream_patterns(self, patterns: tuple[str, ...]) -> None:
        """Lift thinning for metrics matching these shell-style patterns (a live stream)."""
        self._stream_patterns = tuple(patterns)
        self._routes = {}

    # Start-up checks -----------------------------------------------------
    def _load_database(self, path: str) -> Any:
        import cantools

        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(full):
            raise AdapterError(f"CAN database not found: {full}")
        try:
            # strict=False: real-world DBCs often have overlapping or
            # out-of-range signal definitions that decode fine anyway.
            db = cantools.database.load_file(full, strict=False)
        except Exception as exc:
            raise AdapterError(f"cannot load CAN database {full}: {exc}") from exc
        if not hasattr(db, "get_message_by_frame_id"):
            raise AdapterError(f"{full} is not a CAN database")
        return db

    def _warn_unmatched_patterns(self) -> None:
        if not self._databases:
            return
        names = [
            (f"{m.name}.{s.name}", s.name) for db in self._databases
            for m in db.messages for s in m.signals
        ]
        for pattern in [*self.options.signals, *self.options.signal_options]:
            if not any(_matches([pattern], q, b) for q, b in names):
                self._log.warning("%s: pattern %r matches no signal of the databases",
                                  self.name, pattern)

    def _check_replay_file(self, path: str) -> None:
        if not os.path.isfile(path):
            raise AdapterError(f"replay file not found: {path}")
        try:
            reader = self._can.LogReader(path)
        except Exception as exc:  # unknown suffix, unreadable header
            raise AdapterError(f"cannot replay {path}: {exc}") from exc
        reader.stop()

    def health_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "frames": self.frames,
            "decoded": self.decoded,
            "unknown_frames": self.unknown_frames,
            "unknown_ids": len(self._unknown_seen),
            "decode_errors": self.decode_errors,
            "error_frames": self.error_frames,
            "bus_off": self.bus_off,
            "bus_errors": self.bus_errors,
            "remote_frames": self.remote_frames,
            "thinned": self.thinned,
            "relative_timestamps": self.relative_timestamps,
        }
        if self.options.replay is not None:
            extra["replay"] = self.options.replay
            extra["replay_passes"] = self.replay_passes
        else:
            extra["interface"] = self.options.interface
            extra["channel"] = self.options.channel
        return extra


def _python_can_filter(flt: CanFilter) -> dict[str, Any]:
    out: dict[str, Any] = {
        "can_id": flt.can_id,
        "can_mask": 0x1FFF_FFFF if flt.can_mask is None else flt.can_mask,
    }
    if flt.extended is not None:
        out["extended"] = flt.extended
    return out


def _passes(filters: list[dict[str, Any]], msg: Any) -> bool:
    # The same rule python-can applies on a bus, for replayed frames.
    for flt in filters:
        if "extended" in flt and flt["extended"] != msg.is_extended_id:
            continue
        if (flt["can_id"] ^ msg.arbitration_id) & flt["can_mask"] == 0:
            return True
    return False
