"""MAVLink source: telemetry from an autopilot (ArduPilot, PX4) via pymavlink.

Metric names
    Every numeric field of an allowed message becomes ``<message>.<field>``
    in lower case: ``attitude.roll``, ``global_position_int.lat``. Array
    fields become one metric per element, ``battery_status.voltages.0``,
    ``.1``, ...; ``char[]`` fields become string (event) values, e.g.
    ``statustext.text``. Enum and bitmask fields stay numbers; HEARTBEAT also
    yields ``heartbeat.armed`` (bool, from ``base_mode`` bit
    MAV_MODE_FLAG_SAFETY_ARMED).

Units (``convert_units: true``)
    Names never change; values of fields whose definition declares one of
    these units are scaled to the unit on the right::

        degE7 -> deg  (x1e-7)    degE5 -> deg  (x1e-5)    cdeg  -> deg  (x0.01)
        mm    -> m    (x0.001)   cm    -> m    (x0.01)    dm    -> m    (x0.1)
        mm/s  -> m/s  (x0.001)   cm/s  -> m/s  (x0.01)    dm/s  -> m/s  (x0.1)
        mV    -> V    (x0.001)   cV    -> V    (x0.01)
        mA    -> A    (x0.001)   cA    -> A    (x0.01)
        cdegC -> degC (x0.01)    d%    -> %    (x0.1)     c%    -> %    (x0.01)

    So ``global_position_int.lat`` is degrees, ``.alt`` metres, ``.vx``
    m/s, ``.hdg`` degrees; ``battery_status.voltages.N`` volts,
    ``.current_battery`` amperes, ``.temperature`` degC;
    ``sys_status.voltage_battery`` volts. Other units (rad, ms, us, mAh, hJ,
    mG, ...) pass through unchanged; time fields such as ``time_boot_ms``
    keep their integer clock. Units come from pymavlink's
    ``fieldunits_by_name``; a pymavlink too old to have it falls back to
    :data:`FALLBACK_UNITS` (the default message set only).

Values that are not readings
    MAVLink marks "unknown / unused" in-band; those values are skipped, not
    emitted: any ``uint16_t`` field or array element equal to UINT16_MAX
    (65535; e.g. unused cells of ``battery_status.voltages``, unknown
    ``global_position_int.hdg`` or ``gps_raw_int.vel``), the sentinels of
    :data:`UNKNOWN_VALUES`, and non-finite floats (NaN means "not known").
    ``uint8_t``/``int8_t`` arrays longer than 20 elements are raw data blocks
    (payloads, log chunks, keys) and are skipped; empty strings are skipped.

Tags and time
    Every point carries ``system_id`` and ``component_id`` (strings); messages
    with an instance field (e.g. BATTERY_STATUS ``id``) add ``instance``.
    Timestamps are the receive time, one per message, from the pipeline's
    clock (the system clock while it is trusted, see docs/time.md): MAVLink's
    ``time_boot_ms``/``time_usec`` count from the autopilot's boot and are
    emitted as ordinary fields instead.

Time source (``time_source: true``)
    SYSTEM_TIME's ``time_unix_usec`` (the autopilot's GPS time; 0 until it
    has one) becomes a time reference for the gateway's clock, whether or not
    SYSTEM_TIME is in ``messages``: on a computer without a real-time clock,
    points wait for it (or for network time) instead of leaving stamped 1970.
    A time before the package's build date (a GPS week rollover) is ignored.

Link and sessions
    The link is "up" while HEARTBEATs from a non-GCS component arrive; after
    ``link_timeout`` seconds without one the state becomes ``link_lost`` and
    the connection is reopened once (with backoff while reopening fails),
    then listens until a HEARTBEAT brings the link back up. With
    ``auto_session`` a HEARTBEAT from an autopilot (``autopilot`` !=
    MAV_AUTOPILOT_INVALID, ``type`` != MAV_TYPE_GCS) with the armed flag
    begins the pipeline session
    ``<session_prefix>-<UTC yyyymmdd-HHMMSS>-sys<system id>``; disarm, link
    loss or stop ends it. One auto session at a time: while one vehicle's
    flight is open, other vehicles arming do not start another.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from annotated_types import Ge, Interval

from plexus.adapters.base import AdapterContext, ThreadedAdapter, describe_error, require
from plexus.errors import AdapterError, InvalidOptions, PlexusError
from plexus.optioncheck import declared_problems

DEFAULT_MESSAGES: tuple[str, ...] = (
    "HEARTBEAT",
    "ATTITUDE",
    "GLOBAL_POSITION_INT",
    "GPS_RAW_INT",
    "VFR_HUD",
    "SYS_STATUS",
    "BATTERY_STATUS",
)

#: unit -> (converted unit, factor) applied when ``convert_units`` is on.
UNIT_SCALES: dict[str, tuple[str, float]] = {
    "degE7": ("deg", 1e-7),
    "degE5": ("deg", 1e-5),
    "cdeg": ("deg", 0.01),
    "mm": ("m", 0.001),
    "cm": ("m", 0.01),
    "dm": ("m", 0.1),
    "mm/s": ("m/s", 0.001),
    "cm/s": ("m/s", 0.01),
    "dm/s": ("m/s", 0.1),
    "mV": ("V", 0.001),
    "cV": ("V", 0.01),
    "mA": ("A", 0.001),
    "cA": ("A", 0.01),
    "cdegC": ("degC", 0.01),
    "d%": ("%", 0.1),
    "c%": ("%", 0.01),
}

#: Field units of the default message set, used only when pymavlink's message
#: classes lack ``fieldunits_by_name``.
FALLBACK_UNITS: dict[str, dict[str, str]] = {
    "GLOBAL_POSITION_INT": {
        "lat": "degE7", "lon": "degE7", "alt": "mm", "relative_alt": "mm",
        "vx": "cm/s", "vy": "cm/s", "vz": "cm/s", "hdg": "cdeg",
    },
    "GPS_RAW_INT": {
        "lat": "degE7", "lon": "degE7", "alt": "mm", "vel": "cm/s", "cog": "cdeg",
        "alt_ellipsoid": "mm", "h_acc": "mm", "v_acc": "mm", "vel_acc": "mm/s",
        "hdg_acc": "degE5", "yaw": "cdeg",
    },
    "SYS_STATUS": {
        "load": "d%", "voltage_battery": "mV", "current_battery": "cA", "drop_rate_comm": "c%",
    },
    "BATTERY_STATUS": {
        "temperature": "cdegC", "voltages": "mV", "current_battery": "cA", "voltages_ext": "mV",
    },
}

#: "Not measured" markers of signed or uint8 fields (per the MAVLink common
#: message set) that the UINT16_MAX rule does not catch; such values are skipped.
UNKNOWN_VALUES: dict[tuple[str, str], int] = {
    ("SYS_STATUS", "current_battery"): -1,
    ("SYS_STATUS", "battery_remaining"): -1,
    ("BATTERY_STATUS", "temperature"): 32767,
    ("BATTERY_STATUS", "current_battery"): -1,
    ("BATTERY_STATUS", "current_consumed"): -1,
    ("BATTERY_STATUS", "energy_consumed"): -1,
    ("BATTERY_STATUS", "battery_remaining"): -1,
    ("GPS_RAW_INT", "satellites_visible"): 255,
}

_UINT16_MAX = 65535
_TIME_LATENCY_NS = 200_000_000
_MAX_BYTE_ARRAY = 20
_MAV_MODE_FLAG_SAFETY_ARMED = 128
_MAV_TYPE_GCS = 6
_MAV_AUTOPILOT_INVALID = 8
# What our own HEARTBEATs claim to be (MAV_COMP_ID_MISSIONPLANNER, a GCS).
_OWN_COMPONENT = 190

_NUMBER, _ARRAY, _STRING = 0, 1, 2
# (attribute, metric, kind, scale, unknown value, element metric names)
_FieldPlan = tuple[str, str, int, float, "int | None", tuple[str, ...]]

# mavutil keeps the dialect in a module global chosen by set_dialect() and the
# MAVLINK20 environment variable; two adapters opening links at once must not
# interleave those steps.
_DIALECT_LOCK = threading.Lock()


def _select_wire_protocol(mavlink2: bool) -> None:
    # mavutil.set_dialect() loads the v20 or v10 dialect modules depending on
    # this variable; it is process-wide, hence _DIALECT_LOCK around its use.
    if mavlink2:
        os.environ["MAVLINK20"] = "1"
    else:
        os.environ.pop("MAVLINK20", None)


class LinkLostError(AdapterError):
    """No HEARTBEAT arrived for ``link_timeout`` seconds."""


@dataclass
class MavlinkOptions:
    """Options of the ``mavlink`` adapter (see configs/mavlink.yaml)."""

    connection: str = field(
        metadata={
            "help": "pymavlink connection string: udpin:0.0.0.0:14550, udpout:host:port, "
            "tcp:host:port, tcpin:host:port, or a serial device such as /dev/ttyACM0"
        }
    )
    baud: Annotated[int, Ge(1)] = field(default=57600, metadata={"help": "serial baud rate (serial devices only)"})
    dialect: str = field(
        default="ardupilotmega",
        metadata={"help": "pymavlink dialect module: ardupilotmega, common, all, ..."},
    )
    mavlink2: bool = field(
        default=True,
        metadata={
            "help": "use the MAVLink 2 dialect modules (reads MAVLink 1 and 2, sends 2); "
            "false reads and sends MAVLink 1"
        },
    )
    source_system: Annotated[int, Interval(ge=1, le=255)] = field(
        default=255, metadata={"help": "our system id in anything we send (1..255)"}
    )
    messages: list[str] = field(
        default_factory=lambda: list(DEFAULT_MESSAGES),
        metadata={"help": 'message names to turn into points; ["*"] for every message'},
    )
    convert_units: bool = field(
        default=True,
        metadata={"help": "scale degE7, mm, cdeg, cm/s, mV, cA, ... to deg, m, m/s, V, A"},
    )
    link_timeout: Annotated[float, Ge(0)] = field(
        default=5.0,
        metadata={
            "help": "seconds without a HEARTBEAT before the link counts as lost and is "
            "reopened once; 0 disables the check"
        },
    )
    heartbeat_interval: Annotated[float, Ge(0)] = field(
        default=0.0,
        metadata={
            "help": "seconds between GCS HEARTBEATs we send (udpout/tcp peers learn our "
            "address from them); 0 = listen only"
        },
    )
    auto_session: bool = field(
        default=False,
        metadata={"help": "begin a session when an autopilot arms, end it on disarm"},
    )
    session_prefix: str = field(
        default="flight",
        metadata={"help": "auto session ids are <prefix>-<UTC yyyymmdd-HHMMSS>-sys<id>"},
    )
    min_interval: Annotated[float, Ge(0)] | None = field(
        default=None,
        metadata={"help": "seconds; emit each message type (per system and component) at most "
                  "once per this interval; null: every message"},
    )
    time_source: bool = field(
        default=False,
        metadata={"help": "use SYSTEM_TIME (the autopilot's GPS time) as a time reference for "
                  "this computer's clock (docs/time.md)"},
    )

    def __post_init__(self) -> None:
        # The rig loader checks the declared limits, each at its line; this holds
        # options built in Python to them too.
        problems = declared_problems(self)
        if problems:
            raise InvalidOptions(problems)


class MavlinkAdapter(ThreadedAdapter):
    """Reads MAVLink from a UDP/TCP/serial link and emits one point per field.

    Parameters:
        options: a :class:`MavlinkOptions`.
        name: the adapter's name in logs and status.

    Raises (from :meth:`start`):
        AdapterError: pymavlink is not installed, the dialect does not exist,
            or ``messages`` names a message the dialect does not define.

    pymavlink keeps its dialect and wire protocol in process-wide state
    (``mavutil.set_dialect``, the ``MAVLINK20`` and ``MAVLINK_DIALECT``
    environment variables); this adapter sets them, under a lock, before
    importing pymavlink and before each connection.

    Health extras: ``messages`` (decoded), ``bad_crc``, ``bad_data`` (other
    undecodable bytes: noise, bad lengths/flags), ``unknown_messages`` (ids
    not in the dialect), ``seq_gaps`` (jumps in a sender's sequence number)
    and ``lost_packets`` (sequence numbers skipped), ``link``
    (waiting/up/lost), ``link_losses``, ``heartbeat_age`` and ``session``.
    """

    type_name: ClassVar[str] = "mavlink"
    extra: ClassVar[str | None] = "mavlink"
    Options: ClassVar[type] = MavlinkOptions

    def __init__(self, options: MavlinkOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: MavlinkOptions = options
        names = [m.strip().upper() for m in options.messages]
        self._allowed: frozenset[str] | None = None if "*" in names else frozenset(names)
        self._mavutil: Any = None
        self._conn: Any = None
        self._plans: dict[str, list[_FieldPlan]] = {}
        self._tags: dict[tuple[int, int, int | None], dict[str, str]] = {}
        self._last_seq: dict[tuple[int, int], int] = {}
        self.messages = 0
        self.bad_crc = 0
        self.bad_data = 0
        self.unknown_messages = 0
        self.seq_gaps = 0
        self.lost_packets = 0
        self.link = "waiting"
        self.link_losses = 0
        self._last_heartbeat: float | None = None  # monotonic
        self._session_lock = threading.Lock()
        self._session: str | None = None
        self._session_system: int | None = None
        self.thinned = 0
        self.time_references = 0
        self._last_emit: dict[tuple[str, int, int], float] = {}
        self._stream_patterns: tuple[str, ...] = ()
        self._lifted: dict[str, bool] = {}
        # Sends from command threads and our heartbeats share pymavlink's sequence counter.
        self._send_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._ack_waiters: list[tuple[int, list[Any], threading.Event]] = []
        #: (system, component, MAV_TYPE, MAV_AUTOPILOT) of the vehicle last heard.
        self.vehicle: tuple[int, int, int, int] | None = None

    # Lifecycle -----------------------------------------------------------
    def start(self, ctx: AdapterContext) -> None:
        self._prepare()
        super().start(ctx)

    def preflight(self) -> list[str]:
        try:
            self._prepare()
        except AdapterError as exc:
            return [str(exc)]
        return []

    def preflight_online(self, timeout: float) -> list[str]:
        if self._mavutil is None:
            return []
        try:
            self.connect()
        except Exception as exc:
            return [f"cannot open {self.options.connection}: {describe_error(exc)}"]
        self.disconnect()
        return []

    def _prepare(self) -> None:
        """Load pymavlink with our dialect and check the messages asked for exist in it."""
        opts = self.options
        with _DIALECT_LOCK:
            # mavutil loads a dialect as it is imported; let that be ours
            # rather than its default, the much larger "all".
            os.environ.setdefault("MAVLINK_DIALECT", opts.dialect)
            _select_wire_protocol(opts.mavlink2)
            self._mavutil = require("pymavlink.mavutil", "mavlink")
        wire = "v20" if opts.mavlink2 else "v10"
        try:
            dialect = importlib.import_module(f"pymavlink.dialects.{wire}.{opts.dialect}")
        except ImportError as exc:
            raise AdapterError(
                f"unknown MAVLink dialect {opts.dialect!r} "
                "(try ardupilotmega, common or all)"
            ) from exc
        if self._allowed is not None:
            known = {cls.msgname for cls in dialect.mavlink_map.values()}
            unknown = sorted(self._allowed - known)
            if unknown:
                raise AdapterError(
                    f"messages {unknown} are not in dialect {opts.dialect!r}"
                )

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self._end_session()

    def connect(self) -> None:
        opts = self.options
        mavutil = self._mavutil
        with _DIALECT_LOCK:
            _select_wire_protocol(opts.mavlink2)
            conn = mavutil.mavlink_connection(
                opts.connection,
                baud=opts.baud,
                source_system=opts.source_system,
                source_component=_OWN_COMPONENT,
                dialect=opts.dialect,
            )
        self._conn = conn

    def disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a dead serial port may raise
                self._log.debug("%s: close failed: %s", self.name, exc)

    def run_connected(self) -> None:
        conn = self._conn
        if conn is None:
            return
        opts = self.options
        if self.link == "lost":
            self.state = "link_lost"
        next_heartbeat = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if opts.heartbeat_interval > 0 and now >= next_heartbeat:
                next_heartbeat = now + opts.heartbeat_interval
                self._send_heartbeat(conn)
            last = self._last_heartbeat
            if (
                self.link == "up"
                and opts.link_timeout > 0
                and last is not None
                and now - last > opts.link_timeout
            ):
                self._link_lost()
            msg = conn.recv_match(blocking=True, timeout=0.5)
            if msg is not None:
                self._on_message(msg)
        self._end_session()

    # Per message ---------------------------------------------------------
    def _on_message(self, msg: Any) -> None:
        mtype: str = msg.get_type()
        msg_id: int = msg.get_msgId()
        if msg_id < 0:
            if mtype == "BAD_DATA":
                reason = str(getattr(msg, "reason", "bad data"))
                if "CRC" in reason:
                    self.bad_crc += 1
                else:
                    self.bad_data += 1
                self.bad_input(f"bad MAVLink data: {reason}")
            else:  # UNKNOWN_<id>: not defined in the configured dialect
                self.unknown_messages += 1
            return
        self.messages += 1
        system: int = msg.get_srcSystem()
        component: int = msg.get_srcComponent()
        self._check_seq(system, component, msg.get_seq())
        if mtype == "COMMAND_ACK" and self._ack_waiters:
            self._on_ack(msg)
        if mtype == "SYSTEM_TIME" and self.options.time_source:
            self._observe_time(msg)

        if mtype == "HEARTBEAT":
            self._on_heartbeat(msg, system)
            if msg.type != _MAV_TYPE_GCS:
                self.vehicle = (system, component, msg.type, msg.autopilot)
            if (self._allowed is None or mtype in self._allowed) and not self._thin(
                    mtype, system, component):
                ts = self._emit_fields(msg, mtype, system, component)
                armed = bool(msg.base_mode & _MAV_MODE_FLAG_SAFETY_ARMED)
                self.emit("heartbeat.armed", armed, ts, self._tags_for(system, component, None))
            if self._session is not None and self._session_system == system:
                self._maybe_end_on_disarm(msg)
            return
        if self._allowed is not None and mtype not in self._allowed:
            return
        if self._thin(mtype, system, component):
            return
        self._emit_fields(msg, mtype, system, component)

    def _thin(self, mtype: str, system: int, component: int) -> bool:
        """True when this message is skipped by ``min_interval`` (and no stream lifts it)."""
        interval = self.options.min_interval
        if not interval:
            return False
        if self._stream_patterns:
            lifted = self._lifted.get(mtype)
            if lifted is None:
                prefix = mtype.lower()
                lifted = self._lifted[mtype] = any(
                    fnmatch.fnmatchcase(f"{prefix}.{name.lower()}", p)
                    for p in self._stream_patterns
                    for name in [*getattr(self._message_class(mtype), "fieldnames", []), "*"])
            if lifted:
                return False
        key = (mtype, system, component)
        now = time.monotonic()
        last = self._last_emit.get(key)
        if last is not None and now - last < interval * 0.99:
            self.thinned += 1
            return True
        if len(self._last_emit) > 4096:
            self._last_emit.clear()
        self._last_emit[key] = now
        return False

    def _message_class(self, mtype: str) -> Any:
        mavlink = getattr(self._mavutil, "mavlink", None)
        msg_id = getattr(mavlink, f"MAVLINK_MSG_ID_{mtype}", None)
        return getattr(mavlink, "mavlink_map", {}).get(msg_id)

    # Changes and commands at run time (remote commands) -----------------
    def set_min_interval(self, seconds: float | None) -> None:
        """Emit each message type at most once per ``seconds`` (None or 0: all)."""
        self.options.min_interval = seconds or None
        self._last_emit.clear()

    def set_stream_patterns(self, patterns: tuple[str, ...]) -> None:
        """Lift ``min_interval`` for messages with a metric matching these patterns."""
        self._stream_patterns = tuple(patterns)
        self._lifted = {}

    def mode_mapping(self) -> dict[str, Any]:
        """Flight mode names of the vehicle last heard (pymavlink's tables): name -> mode."""
        conn = self._conn
        if conn is None or self.vehicle is None:
            return {}
        try:
            mapping = conn.mode_mapping()
        except Exception:  # pymavlink raises on vehicle types it has no table for
            mapping = None
        return dict(mapping or {})

    def command_long(self, command: int, params: list[float], timeout: float,
                     on_progress: Any = None) -> Any:
        """Send COMMAND_LONG to the vehicle and wait for its COMMAND_ACK.

        Returns the COMMAND_ACK message, or None when none came within
        ``timeout`` seconds. An ``IN_PROGRESS`` ack (result 5) calls
        ``on_progress(ack)`` and keeps waiting, ``timeout`` afresh.

        Raises:
            AdapterError: the link is not open, or no vehicle has been heard.
        """
        conn, vehicle = self._conn, self.vehicle
        if conn is None or vehicle is None or self.link != "up":
            raise AdapterError(f"{self.name}: no vehicle is connected (link {self.link})")
        target_system, target_component = vehicle[0], vehicle[1]
        box: list[Any] = []
        event = threading.Event()
        waiter = (command, box, event)
        with self._ack_lock:
            self._ack_waiters.append(waiter)
        try:
            with self._send_lock:
                conn.mav.command_long_send(target_system, target_component, command, 0,
                                           *[float(p) for p in (params + [0.0] * 7)[:7]])
            while True:
                if not event.wait(timeout):
                    return None
                ack = box.pop(0)
                if not box:
                    event.clear()
                if ack.result == 5 and on_progress is not None:  # MAV_RESULT_IN_PROGRESS
                    on_progress(ack)
                    continue
                return ack
        finally:
            with self._ack_lock:
                self._ack_waiters.remove(waiter)

    def _on_ack(self, msg: Any) -> None:
        with self._ack_lock:
            for command, box, event in self._ack_waiters:
                if command == msg.command:
                    box.append(msg)
                    event.set()

    def _observe_time(self, msg: Any) -> None:
        unix_us = getattr(msg, "time_unix_usec", 0)
        if not unix_us:
            return  # the autopilot has no GPS time yet
        received = self.clock.mono_ns()
        # The message left the autopilot a little before it arrived: a link's latency,
        # generously 200 ms (a 57600-baud radio with queued telemetry).
        if self.clock.observe("mavlink", int(unix_us) * 1000, received - _TIME_LATENCY_NS,
                              received):
            self.time_references += 1

    def _check_seq(self, system: int, component: int, seq: int) -> None:
        key = (system, component)
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if last is None or seq == (last + 1) & 0xFF or seq == last:
            return  # first packet, in order, or a duplicate (a router echoing)
        self.seq_gaps += 1
        self.lost_packets += (seq - last - 1) & 0xFF

    def _emit_fields(self, msg: Any, mtype: str, system: int, component: int) -> float | None:
        plan = self._plans.get(mtype)
        if plan is None:
            plan = self._plans[mtype] = self._build_plan(type(msg), mtype)
        instance_field = getattr(msg, "_instance_field", None)
        instance = getattr(msg, instance_field, None) if instance_field else None
        tags = self._tags_for(system, component, instance)
        ts = self.clock.now()  # None while no trustworthy time: the points wait for one
        emit = self.emit
        for attr, metric, kind, scale, unknown, names in plan:
            value = getattr(msg, attr, None)
            if value is None:
                continue
            if kind == _NUMBER:
                # value - value is non-zero only for NaN and +-inf.
                if value == unknown or value - value:
                    continue
                emit(metric, value * scale if scale != 1.0 else value, ts, tags)
            elif kind == _ARRAY:
                if not isinstance(value, (list, tuple)):
                    continue
                for item, item_metric in zip(value, names, strict=False):
                    if item == unknown or item - item:
                        continue
                    emit(item_metric, item * scale if scale != 1.0 else item, ts, tags)
            else:
                if isinstance(value, (bytes, bytearray)):
                    value = value.decode("utf-8", "replace")
                value = value.rstrip("\x00")
                if value:
                    emit(metric, value, ts, tags)
        return ts

    def _build_plan(self, cls: Any, mtype: str) -> list[_FieldPlan]:
        fieldnames: list[str] = list(getattr(cls, "fieldnames", []))
        fieldtypes: list[str] = list(getattr(cls, "fieldtypes", []))
        lengths = dict(zip(getattr(cls, "ordered_fieldnames", []),
                           getattr(cls, "array_lengths", []), strict=True))
        units: dict[str, str] | None = getattr(cls, "fieldunits_by_name", None)
        if units is None:
            units = FALLBACK_UNITS.get(mtype, {})
        prefix = mtype.lower()
        plan: list[_FieldPlan] = []
        for fname, ftype in zip(fieldnames, fieldtypes, strict=True):
            metric = f"{prefix}.{fname.lower()}"
            length = int(lengths.get(fname, 0) or 0)
            scale = 1.0
            if self.options.convert_units and fname in units:
                scale = UNIT_SCALES.get(units[fname], ("", 1.0))[1]
            unknown: int | None = UNKNOWN_VALUES.get((mtype, fname))
            if unknown is None and ftype == "uint16_t":
                unknown = _UINT16_MAX
            if ftype == "char":
                plan.append((fname, metric, _STRING, 1.0, None, ()))
            elif length:
                if ftype in ("uint8_t", "int8_t") and length > _MAX_BYTE_ARRAY:
                    continue
                names = tuple(f"{metric}.{i}" for i in range(length))
                plan.append((fname, metric, _ARRAY, scale, unknown, names))
            else:
                plan.append((fname, metric, _NUMBER, scale, unknown, ()))
        return plan

    def _tags_for(self, system: int, component: int, instance: Any) -> dict[str, str]:
        # Points share tag dicts (never mutated) so the hot path allocates none.
        key = (system, component, instance)
        tags = self._tags.get(key)
        if tags is None:
            if len(self._tags) > 4096:  # a noisy link inventing ids must not grow this forever
                self._tags.clear()
            tags = {"system_id": str(system), "component_id": str(component)}
            if instance is not None:
                tags["instance"] = str(instance)
            self._tags[key] = tags
        return tags

    # Link and sessions ---------------------------------------------------
    def _on_heartbeat(self, msg: Any, system: int) -> None:
        if msg.type == _MAV_TYPE_GCS:
            return  # another ground station says nothing about the vehicle link
        self._last_heartbeat = time.monotonic()
        if self.link != "up":
            self.link = "up"
            self.state = "connected"
        if (
            self.options.auto_session
            and self._session is None
            and msg.autopilot != _MAV_AUTOPILOT_INVALID
            and msg.base_mode & _MAV_MODE_FLAG_SAFETY_ARMED
        ):
            self._begin_session(system, msg)

    def _maybe_end_on_disarm(self, msg: Any) -> None:
        if (
            msg.type != _MAV_TYPE_GCS
            and msg.autopilot != _MAV_AUTOPILOT_INVALID
            and not msg.base_mode & _MAV_MODE_FLAG_SAFETY_ARMED
        ):
            self._end_session()

    def _begin_session(self, system: int, msg: Any) -> None:
        now = self.clock.now()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) if now is not None \
            else f"notime{self.clock.mono_ns() // 1_000_000_000}"
        session_id = f"{self.options.session_prefix}-{stamp}-sys{system}"
        # A distinct tag key: session tags apply to every source's points, and
        # must not overwrite the system_id tag of another vehicle's points.
        tags = {"vehicle_system_id": str(system), "vehicle_type": str(msg.type)}
        assert self._ctx is not None
        with self._session_lock:
            try:
                self._ctx.begin_session(session_id, tags=tags)
            except PlexusError as exc:
                self.record_error(exc)
                return
            self._session = session_id
            self._session_system = system

    def _end_session(self) -> None:
        with self._session_lock:
            session_id, self._session, self._session_system = self._session, None, None
            if session_id is None or self._ctx is None:
                return
            try:
                self._ctx.end_session(session_id)
            except PlexusError as exc:
                self.record_error(exc)

    def _link_lost(self) -> None:
        # Ending the flight session on link loss: sessions tag every source's
        # points, so a session left open for a vehicle that may be powered off
        # would mislabel everything after it. A new one begins when an armed
        # HEARTBEAT is heard again.
        self._end_session()
        self.link = "lost"
        self.link_losses += 1
        self.state = "link_lost"
        # Reopen once per loss (a stale TCP peer or serial port comes back
        # only that way); then listen, since every reopen of a UDP port drops
        # what arrives while it is closed.
        raise LinkLostError(
            f"no HEARTBEAT for {self.options.link_timeout:g} s; reopening the link"
        )

    def _send_heartbeat(self, conn: Any) -> None:
        try:
            with self._send_lock:
                conn.mav.heartbeat_send(_MAV_TYPE_GCS, _MAV_AUTOPILOT_INVALID, 0, 0, 0)
        except OSError as exc:
            self._log.debug("%s: heartbeat send failed: %s", self.name, exc)

    def health_extra(self) -> dict[str, Any]:
        last = self._last_heartbeat
        extra = {
            "messages": self.messages,
            "bad_crc": self.bad_crc,
            "bad_data": self.bad_data,
            "unknown_messages": self.unknown_messages,
            "seq_gaps": self.seq_gaps,
            "lost_packets": self.lost_packets,
            "link": self.link,
            "link_losses": self.link_losses,
            "heartbeat_age": None if last is None else round(time.monotonic() - last, 3),
            "reconnects": self.reconnects,
            "thinned": self.thinned,
            "session": self._session,
        }
        if self.options.time_source:
            extra["time_references"] = self.time_references
        return extra
