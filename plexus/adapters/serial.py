"""Serial source: read text lines from a serial port (pyserial) and turn them into points.

The port is a device path (``/dev/ttyUSB0``, ``COM3``) or any pyserial URL:
``socket://host:port`` (a serial-to-TCP bridge), ``rfc2217://host:port``,
``loop://`` (pyserial's in-process loopback). pyserial is imported only
when the adapter starts.

Lines
    Bytes are split on ``line_terminator`` (default ``"\\n"``); a trailing
    ``"\\r"`` (and a leading ``"\\n"`` when the terminator is ``"\\r"``) is
    stripped, blank lines are skipped. A line that does not decode with
    ``encoding``, that its format cannot parse, or that grows past
    ``max_line_bytes`` without a terminator (it is dropped up to the next
    terminator) is a bad line: counted, logged at a limited rate, dropped.
    The adapter keeps reading.

Formats and metric names (``prefix``, when set, is put in front with a ``.``)
    ``json``   one object per line; nested objects flattened to ``a.b.c``,
               arrays kept whole as one list value, ``null`` skipped; JSON
               types are kept.
    ``csv``    cells named by ``columns`` or by the first line (the header);
               a row equal to the header is skipped, an empty cell skips that
               column, a row with the wrong number of cells is bad.
    ``kv``     ``key=value`` pairs split on whitespace and/or commas (the
               separator is ``kv_separator``; spaces around it are allowed,
               so ``T: 21.5, H: 40`` works with ``":"``); non-pair text is
               skipped, a line without a pair is bad.
    ``regex``  named groups of ``pattern`` (``re.search``); a line it does
               not match is ignored (counted in ``ignored_lines``).
    ``nmea``   NMEA 0183 from a GNSS receiver, see
               :class:`plexus.adapters.lineformats.NmeaParser`: metrics
               ``{prefix or "gps"}.lat``, ``.lon`` (decimal degrees, negative
               south/west), ``.alt`` (m), ``.speed`` (m/s, converted from
               knots), ``.course`` (deg true), ``.fix_quality``,
               ``.satellites``, ``.hdop``. A wrong or (with
               ``nmea_require_checksum``) missing ``*hh`` checksum is counted
               in ``bad_checksums`` and the sentence is dropped. NMEA points
               carry the gateway's receive time. With ``time_source: true``
               the UTC date and time of RMC (with a valid fix) and ZDA
               sentences is a time reference for the gateway's clock: on a
               computer without a real-time clock, points wait for it (or for
               network time) instead of leaving stamped 1970 (docs/time.md).

    Text values (csv, kv, regex) become ints or floats when they parse as
    numbers, ``true``/``false`` become bools, ``nan``/``inf`` are skipped,
    anything else is a string event value.

Timestamps
    Points carry the gateway's receive time unless ``timestamp_field`` names
    a field (json: a flattened name such as ``meta.ts``; csv: a column; kv:
    a key) or, for regex, a group (``timestamp`` when ``timestamp_field`` is
    unset). Its value is Unix seconds, ms, us or ns (told apart by
    magnitude) or an ISO 8601 string; it is not emitted as a metric. A
    missing or unusable one is counted in ``bad_timestamps`` and the line
    keeps its receive time.

Link loss
    A read error (the USB adapter unplugged, a pty whose other end closed) or
    a device path that disappears raises inside the reader, and the adapter
    reopens the port with backoff (0.5 s doubling to 5 s, +-25% jitter),
    state ``reconnecting`` meanwhile. A port missing at start is retried the
    same way. Each successful reopen is counted in ``reopens``.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Len, MinLen

from plexus.adapters.base import AdapterContext, ThreadedAdapter, describe_error, require
from plexus.adapters.lineformats import (
    ChecksumError,
    CsvParser,
    JsonParser,
    KvParser,
    LineError,
    LineParser,
    NmeaParser,
    RegexParser,
    pop_reading,
    timestamp_seconds,
)
from plexus.errors import AdapterError, InvalidOptions, PlexusError
from plexus.optioncheck import declared_problems
from plexus.point import timestamp_ms

__all__ = ["SerialAdapter", "SerialOptions"]

log = logging.getLogger(__name__)

# Short enough that stop() is prompt even where cancel_read() is missing
# (socket:// URLs); long enough that an idle port costs nothing.
READ_TIMEOUT = 0.5

_NMEA_LATENCY_NS = 1_000_000_000


@dataclass
class SerialOptions:
    """Options of the ``serial`` adapter (see the module docstring for the line formats)."""

    port: str = field(
        metadata={"help": "device path (/dev/ttyUSB0, COM3) or pyserial URL "
                  "(socket://host:port, rfc2217://host:port, loop://)"}
    )
    baudrate: Annotated[int, Ge(1)] = field(default=115200, metadata={"help": "bits per second"})
    bytesize: Literal[5, 6, 7, 8] = field(default=8, metadata={"help": "data bits: 5, 6, 7 or 8"})
    parity: Literal["N", "E", "O", "M", "S"] = field(
        default="N", metadata={"help": "parity: N none, E even, O odd, M mark, S space"}
    )
    stopbits: Literal[1, 1.5, 2] = field(default=1, metadata={"help": "stop bits: 1, 1.5 or 2"})  # type: ignore[valid-type]  # floats are fine to pydantic
    rtscts: bool = field(default=False, metadata={"help": "RTS/CTS hardware flow control"})
    xonxoff: bool = field(default=False, metadata={"help": "XON/XOFF software flow control"})
    encoding: str = field(
        default="utf-8",
        metadata={"help": "text encoding of the lines; a line that does not decode is bad"},
    )
    line_terminator: Annotated[str, MinLen(1)] = field(
        default="\n",
        metadata={"help": "end of a line; a trailing '\\r' is stripped as well"},
    )
    max_line_bytes: Annotated[int, Ge(1)] = field(
        default=4096,
        metadata={"help": "a longer line is counted as bad and dropped up to the next terminator"},
    )
    format: Literal["json", "csv", "kv", "nmea", "regex"] = field(
        default="json", metadata={"help": "line format: json, csv, kv, nmea or regex"}
    )
    prefix: str | None = field(
        default=None,
        metadata={"help": "prepended to every metric with a '.'; nmea default: 'gps'"},
    )
    timestamp_field: str | None = field(
        default=None,
        metadata={"help": "field (json/csv/kv) or group (regex; default 'timestamp') holding the "
                  "reading's time: Unix s/ms/us/ns by magnitude, or ISO 8601; null: receive time"},
    )
    columns: list[str] | None = field(
        default=None, metadata={"help": "csv: column names; null: the first line is the header"}
    )
    delimiter: Annotated[str, Len(1, 1)] = field(
        default=",", metadata={"help": "csv: the one-character cell delimiter"})
    kv_separator: str = field(
        default="=", metadata={"help": "kv: between key and value; pairs split on spaces/commas"}
    )
    pattern: str | None = field(
        default=None,
        metadata={"help": "regex: a Python regular expression; named groups become metrics"},
    )
    nmea_require_checksum: bool = field(
        default=True,
        metadata={"help": "nmea: drop sentences without a '*hh' checksum (a wrong one is "
                  "always dropped)"},
    )
    time_source: bool = field(
        default=False,
        metadata={"help": "nmea: use the GPS date and time (RMC, ZDA) as a time reference for "
                  "this computer's clock (docs/time.md)"},
    )
    discard_first_line: bool = field(
        default=False,
        metadata={"help": "drop the first line after each open, which is usually cut when a "
                  "device streams all the time; leave false for devices that reset on open"},
    )

    def __post_init__(self) -> None:
        # The rig loader has checked the declared limits and choices already, each at
        # its line; this holds options built in Python to them too, and adds the rules
        # that join several fields. Every problem is reported, not only the first.
        problems = declared_problems(self)
        if not isinstance(self.port, str) or not self.port:
            problems.append(("port", "must name a device or a pyserial URL"))
        if not self.line_terminator:
            problems.append(("line_terminator", "must not be empty"))
        if len(self.delimiter) != 1:
            problems.append(("delimiter", f"must be one character, got {self.delimiter!r}"))
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            problems.append(("encoding", f"unknown encoding {self.encoding!r}"))
        if self.columns is not None and not any(c.strip() for c in self.columns):
            problems.append(("columns", "must name at least one column"))
        if self.format == "regex" and self.pattern is None:
            problems.append(("pattern", "format: regex needs a pattern"))
        if self.format != "regex" and self.pattern is not None:
            problems.append(("pattern", "only used with format: regex"))
        if self.format == "nmea" and self.timestamp_field is not None:
            problems.append(("timestamp_field", "not used with format: nmea"))
        if self.time_source and self.format != "nmea":
            problems.append(("time_source", "needs format: nmea (a GPS receiver)"))
        if problems:
            raise InvalidOptions(problems)
        # Build the parser once so a bad pattern or separator fails at load, with its reason.
        make_parser(self)


def make_parser(options: SerialOptions) -> LineParser:
    """The line parser for ``options.format``; raises ConfigError for unusable options."""
    try:
        if options.format == "json":
            return JsonParser()
        if options.format == "csv":
            return CsvParser(options.columns, options.delimiter)
        if options.format == "kv":
            return KvParser(options.kv_separator)
        if options.format == "regex":
            return RegexParser(options.pattern or "")
        return NmeaParser(options.nmea_require_checksum)
    except ValueError as exc:
        key = {"regex": "pattern", "kv": "kv_separator", "csv": "delimiter"}.get(options.format, "")
        raise InvalidOptions([(key, str(exc))]) from exc


class SerialAdapter(ThreadedAdapter):
    """Read lines from a serial port and emit one point per value in each line.

    A reader thread opens the port with the configured settings, reads
    whatever bytes are waiting, splits them into lines itself (cheaper than
    ``readline()``, and binary noise cannot break it) and parses each line
    with the configured format (see the module docstring). A lost or missing
    port is reopened with backoff; ``stop()`` wakes the reader at once.

    Health counters (``health().extra``): ``lines`` received, ``bad_lines``
    dropped (every cause, including the next two), ``bad_checksums`` (NMEA),
    ``overlong_lines``, ``bad_timestamps`` (line kept with its receive time),
    ``ignored_lines`` (a CSV header, a line the regex did not match, an NMEA
    sentence type that is not decoded), ``reopens`` (successful opens after
    the first).

    Parameters:
        options: a :class:`SerialOptions`.
        name: the adapter's name in logs and status.

    Raises:
        AdapterError: from :meth:`start` when pyserial is missing or rejects
            the port URL or settings.
    """

    type_name: ClassVar[str] = "serial"
    extra: ClassVar[str | None] = "serial"
    requires: ClassVar[tuple[str, ...]] = ("serial",)
    Options: ClassVar[type] = SerialOptions
    # A serial device is local: probing for it is cheap, and a replugged USB adapter
    # should be back within seconds, not after the 30 s network default.
    reconnect_max: ClassVar[float] = 5.0

    def __init__(self, options: SerialOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: SerialOptions = options
        self.lines = 0
        self.bad_lines = 0
        self.bad_checksums = 0
        self.overlong_lines = 0
        self.bad_timestamps = 0
        self.ignored_lines = 0
        self.reopens = 0
        self.time_references = 0
        self._opens = 0
        self._serial: ModuleType | None = None
        self._port: Any = None
        self._parser = make_parser(options)
        self._terminator = options.line_terminator.encode(options.encoding)
        prefix = options.prefix
        if prefix is None and options.format == "nmea":
            prefix = "gps"
        self._prefix = f"{prefix}." if prefix else ""
        self._timestamp_field = options.timestamp_field
        if options.format == "regex" and self._timestamp_field is None:
            self._timestamp_field = "timestamp"
        # A plain device path is watched for disappearing; a URL has no file to watch.
        self._device_path = None if "://" in options.port else options.port
        self._skip_line = False

    def __repr__(self) -> str:
        return f"SerialAdapter(name={self.name!r}, port={self.options.port!r}, state={self.state!r})"

    # Lifecycle -----------------------------------------------------------
    def start(self, ctx: AdapterContext) -> None:
        serial = require("serial", "serial")
        # Build (without opening) once here so a bad URL scheme or setting fails now,
        # not as an endless reopen loop in the background.
        try:
            self._make_port(serial)
        except (ValueError, serial.SerialException) as exc:
            raise AdapterError(f"cannot use port {self.options.port!r}: {exc}") from exc
        self._serial = serial
        super().start(ctx)

    def preflight(self) -> list[str]:
        try:
            serial = require("serial", "serial")
            self._make_port(serial)
        except AdapterError as exc:
            return [str(exc)]
        except (ValueError, serial.SerialException) as exc:
            return [f"cannot use port {self.options.port!r}: {exc}"]
        return []

    def preflight_online(self, timeout: float) -> list[str]:
        serial = require("serial", "serial")
        try:
            port = self._make_port(serial)
            port.open()
        except Exception as exc:
            return [f"cannot open {self.options.port}: {describe_error(exc)}"]
        port.close()
        return []

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        # The reader closes the port itself; close it here only if it never got to.
        if self._thread is None or not self._thread.is_alive():
            self._close()

    def _make_port(self, serial: ModuleType) -> Any:
        o = self.options
        return serial.serial_for_url(
            o.port,
            do_not_open=True,
            baudrate=o.baudrate,
            bytesize=o.bytesize,
            parity=o.parity,
            stopbits=int(o.stopbits) if o.stopbits in (1, 2) else o.stopbits,
            rtscts=o.rtscts,
            xonxoff=o.xonxoff,
            timeout=READ_TIMEOUT,
        )

    def connect(self) -> None:
        serial = self._serial
        assert serial is not None, "connect() before start()"
        port = self._make_port(serial)
        try:
            port.open()
        except (serial.SerialException, OSError) as exc:
            raise AdapterError(f"cannot open {self.options.port}: {exc}") from exc
        self._port = port
        self._opens += 1
        if self._opens > 1:
            self.reopens += 1
            self._log.info("%s: reopened %s", self.name, self.options.port)
        else:
            self._log.info("%s: opened %s at %d baud", self.name, self.options.port,
                           self.options.baudrate)
        self._skip_line = self.options.discard_first_line

    def disconnect(self) -> None:
        port = self._port
        if port is None:
            return
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            # stop() from another thread: closing the fd under a blocked read could let the
            # number be reused by another file; wake the reader and let it close the port.
            cancel = getattr(port, "cancel_read", None)
            if cancel is not None:
                cancel()
            return
        self._close()

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception as exc:  # a vanished device may fail to close; it is gone anyway
                self._log.debug("%s: close failed: %s", self.name, exc)

    # Reading -------------------------------------------------------------
    def run_connected(self) -> None:
        port = self._port
        stopping = self.stopping
        terminator = self._terminator
        max_len = self.options.max_line_bytes
        handle = self._handle_line
        buf = bytearray()
        discarding = False  # inside an over-long line: drop bytes up to the next terminator
        while not stopping.is_set():
            # read(n) returns as soon as n bytes are there; in_waiting or 1 never waits for
            # bytes that have not arrived, and a quiet port returns empty after READ_TIMEOUT.
            chunk = port.read(port.in_waiting or 1)
            if not chunk:
                if self._device_path is not None and not os.path.exists(self._device_path):
                    raise AdapterError(f"{self._device_path} disappeared")
                continue
            buf += chunk
            if buf.find(terminator) != -1:
                parts = buf.split(terminator)
                buf = parts.pop()
                if discarding:
                    del parts[0]  # the tail of the over-long line
                    discarding = False
                for raw in parts:
                    handle(raw)
            if len(buf) > max_len:
                if not discarding:
                    self.lines += 1
                    self._overlong(len(buf))
                    discarding = True
                buf = bytearray()

    def _overlong(self, size: int) -> None:
        self._skip_line = False  # a cut first line that is also too long is dropped once
        self.overlong_lines += 1
        self.bad_lines += 1
        self.bad_input(f"line longer than max_line_bytes ({size} > "
                       f"{self.options.max_line_bytes}), dropped")

    def _handle_line(self, raw: bytearray) -> None:
        self.lines += 1
        if len(raw) > self.options.max_line_bytes:
            self._overlong(len(raw))
            return
        if self._skip_line:
            self._skip_line = False
            return
        try:
            line = raw.decode(self.options.encoding).strip("\r\n")
        except UnicodeDecodeError as exc:
            self.bad_lines += 1
            self.bad_input(f"line is not {self.options.encoding} text ({exc.reason} at byte "
                           f"{exc.start}): {bytes(raw[:40])!r}")
            return
        if not line:
            return
        try:
            readings = self._parser.parse(line)
        except LineError as exc:
            self.bad_lines += 1
            if isinstance(exc, ChecksumError):
                self.bad_checksums += 1
            self.bad_input(f"bad {self.options.format} line ({exc}): {line[:60]!r}")
            return
        if self.options.time_source:
            utc = getattr(self._parser, "utc", None)
            if utc is not None:
                self._observe_time(utc)
        if readings is None:
            self.ignored_lines += 1
            return
        timestamp = None
        if self._timestamp_field is not None:
            timestamp = self._line_time(pop_reading(readings, self._timestamp_field))
        prefix = self._prefix
        for name, value in readings:
            self.emit(prefix + name, value, timestamp)

    def _observe_time(self, utc: float) -> None:
        received = self.clock.mono_ns()
        # A receiver prints a fix's sentences after its second began: within a second
        # at any common baud rate and output rate.
        if self.clock.observe("gps", int(round(utc * 1000)) * 1_000_000,
                              received - _NMEA_LATENCY_NS, received):
            self.time_references += 1

    def _line_time(self, raw: Any) -> float | None:
        if raw is None:
            self.bad_timestamps += 1
            self.bad_input(f"line has no {self._timestamp_field!r}; using the receive time")
            return None
        try:
            seconds = timestamp_seconds(raw)
            timestamp_ms(seconds)  # the pipeline's bounds: reject here once, not per metric
        except (LineError, PlexusError) as exc:
            self.bad_timestamps += 1
            self.bad_input(f"{exc}; using the receive time")
            return None
        return seconds

    def health_extra(self) -> dict[str, Any]:
        extra = {
            "port": self.options.port,
            "lines": self.lines,
            "bad_lines": self.bad_lines,
            "bad_checksums": self.bad_checksums,
            "overlong_lines": self.overlong_lines,
            "bad_timestamps": self.bad_timestamps,
            "ignored_lines": self.ignored_lines,
            "reopens": self.reopens,
        }
        if self.options.time_source:
            extra["time_references"] = self.time_references
        return extra
