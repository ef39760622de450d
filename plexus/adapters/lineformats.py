"""Parsers for the text line formats that devices print: JSON, CSV, key=value, regex, NMEA 0183.

Pure functions and small classes with no I/O and no driver import, so the
serial adapter (and anything else that reads lines: a file tailer, a TCP
listener) can share them, and tests can call them directly.

Every parser has a ``parse(line)`` method taking one decoded line without its
terminator and returning one of:

* a list of ``(name, value)`` readings (possibly empty: the line was good
  but carried no value, e.g. an NMEA fix that is not valid);
* ``None``: the line is fine but is not something the parser maps (a CSV
  header, an NMEA sentence type it does not decode, a line the regex does
  not match);

or raising :class:`LineError` (:class:`ChecksumError` for NMEA checksum
failures) when the line is malformed.

Values
    :func:`parse_scalar` turns text into an ``int`` or ``float`` when it
    parses as one (``"42"``, ``"-3.5"``, ``"1e3"``), ``True``/``False`` for
    ``true``/``false`` in any case, and otherwise keeps the text as a string.
    Empty text and ``nan``/``inf`` (what an Arduino prints for a failed
    sensor read) give ``None``: that reading is skipped, the rest of the line
    is kept. JSON values keep their JSON types (a quoted ``"42"`` stays a
    string).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

__all__ = [
    "ChecksumError",
    "CsvParser",
    "JsonParser",
    "KvParser",
    "LineError",
    "LineParser",
    "NmeaParser",
    "Reading",
    "RegexParser",
    "flatten_json",
    "nmea_checksum",
    "parse_scalar",
    "pop_reading",
    "timestamp_seconds",
]

Reading = tuple[str, Any]

# Knots to metres per second: one nautical mile is exactly 1852 m.
KNOTS_TO_MPS = 1852.0 / 3600.0

_NOT_A_READING = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity",
                            "+infinity", "-infinity"})


class LineError(ValueError):
    """A line that cannot be used; the message says why."""


class ChecksumError(LineError):
    """An NMEA sentence whose ``*hh`` checksum is wrong or missing."""


class LineParser:
    """Base of the parsers: ``parse(line)`` returns readings, ``None`` (ignored) or raises LineError."""

    def parse(self, line: str) -> list[Reading] | None:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Values and timestamps


def parse_scalar(text: str) -> Any:
    """A number, a bool or the (stripped) text itself; ``None`` for empty text and nan/inf."""
    text = text.strip()
    if not text:
        return None
    first = text[0]
    # Only text that starts like a number is tried as one: int()/float() raising is slow,
    # and most non-numeric cells are words.
    if (first.isdigit() or first in "+-.") and "_" not in text:  # int("1_0") would be 10
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
        return number if math.isfinite(number) else None
    lower = text.lower()
    if lower == "true":
        return True
    if lower == "false":
        return False
    if lower in _NOT_A_READING:
        return None
    return text


def timestamp_seconds(raw: Any) -> float:
    """Unix seconds from a number in s, ms, us or ns (told apart by magnitude),
    a numeric string, or an ISO 8601 string (UTC when it has no offset).

    Below 1e11 is seconds (1e11 s is the year 5138), below 1e14 milliseconds,
    below 1e17 microseconds, above that nanoseconds.

    Raises:
        LineError: the value is none of these.
    """
    if isinstance(raw, str):
        number = parse_scalar(raw)
        if isinstance(number, str):
            try:
                parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
            except ValueError as exc:
                raise LineError(f"timestamp {raw[:40]!r} is neither a number nor ISO 8601") from exc
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            return parsed.timestamp()
        raw = number
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise LineError(f"timestamp {raw!r} is not a finite number")
    magnitude = abs(raw)
    if magnitude < 1e11:
        return float(raw)
    if magnitude < 1e14:
        return raw / 1e3
    if magnitude < 1e17:
        return raw / 1e6
    return raw / 1e9


def pop_reading(readings: list[Reading], name: str) -> Any:
    """Remove the first reading called ``name`` and return its value (``None`` if absent)."""
    for index, (key, value) in enumerate(readings):
        if key == name:
            del readings[index]
            return value
    return None


# --------------------------------------------------------------------------
# JSON


def flatten_json(obj: dict[str, Any], prefix: str = "", out: list[Reading] | None = None
                 ) -> list[Reading]:
    """Readings of a JSON object: nested objects become ``a.b.c``; lists stay whole values;
    ``null`` members are skipped."""
    if out is None:
        out = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if type(value) is dict:
            flatten_json(value, name + ".", out)
        elif value is not None:
            out.append((name, value))
    return out


class JsonParser(LineParser):
    """One JSON object per line; nested objects flattened to ``a.b.c``, arrays kept as list values."""

    def parse(self, line: str) -> list[Reading] | None:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise LineError(f"not JSON: {exc}") from None
        if type(doc) is not dict:
            raise LineError(f"a JSON line must be an object, got {type(doc).__name__}")
        return flatten_json(doc)


# --------------------------------------------------------------------------
# CSV


class CsvParser(LineParser):
    """Delimited values; the column names are given or read from the first line.

    Cells are read with :func:`parse_scalar`; an empty cell is skipped. A row
    whose number of cells differs from the number of columns is a bad line.
    A row equal to the column names (a device that printed its header again
    after a reset) is ignored. Double quotes work as in the csv module.

    Parameters:
        columns: the column names; ``None`` takes them from the first line.
            An empty name drops that column.
        delimiter: one character between cells.
    """

    def __init__(self, columns: list[str] | None = None, delimiter: str = ",") -> None:
        self.delimiter = delimiter
        self.columns: list[str] | None = None if columns is None else [c.strip() for c in columns]

    def _cells(self, line: str) -> list[str]:
        if '"' not in line:  # the csv module is several times slower than str.split
            return line.split(self.delimiter)
        try:
            return next(csv.reader((line,), delimiter=self.delimiter, strict=True))
        except (csv.Error, StopIteration) as exc:
            raise LineError(f"bad CSV quoting: {exc}") from None

    def parse(self, line: str) -> list[Reading] | None:
        cells = [cell.strip() for cell in self._cells(line)]
        columns = self.columns
        if columns is None:
            self.columns = cells
            return None
        if cells == columns:
            return None
        if len(cells) != len(columns):
            raise LineError(f"{len(cells)} cells, expected {len(columns)} ({', '.join(columns)})")
        out: list[Reading] = []
        for name, cell in zip(columns, cells, strict=True):
            if name:
                value = parse_scalar(cell)
                if value is not None:
                    out.append((name, value))
        return out


# --------------------------------------------------------------------------
# key=value


class KvParser(LineParser):
    """``key=value`` pairs separated by whitespace and/or commas.

    ``temp=21.5 hum=40``, ``temp=21.5,hum=40`` and, with ``separator=":"``,
    ``T: 21.5, H: 40`` all work: spaces around the separator are allowed.
    Values cannot contain whitespace or commas. Text that is not a pair is
    skipped; a line with no pair at all is a bad line. An empty value skips
    that key.
    """

    def __init__(self, separator: str = "=") -> None:
        if not separator or separator.strip(" \t,") != separator:
            raise ValueError(f"kv separator must be non-empty, without spaces or commas: {separator!r}")
        sep = re.escape(separator)
        self._pair = re.compile(rf"([^\s,]+?)[ \t]*{sep}[ \t]*([^\s,]*)")

    def parse(self, line: str) -> list[Reading] | None:
        out: list[Reading] = []
        found = False
        for key, text in self._pair.findall(line):
            found = True
            value = parse_scalar(text)
            if value is not None:
                out.append((key, value))
        if not found:
            raise LineError("no key/value pair in the line")
        return out


# --------------------------------------------------------------------------
# Regular expression


class RegexParser(LineParser):
    """Named groups of a regular expression become readings (``re.search``: anchor with ``^...$``).

    Group text is read with :func:`parse_scalar`; a group that did not take
    part in the match or matched nothing is skipped. A line the pattern does
    not match returns ``None`` (ignored), so one device's other output can
    pass by.

    Raises:
        ValueError: from the constructor, when the pattern does not compile
            or has no named group.
    """

    def __init__(self, pattern: str | re.Pattern[str]) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        if not self.pattern.groupindex:
            raise ValueError(f"pattern {self.pattern.pattern!r} has no named group (?P<name>...)")

    def parse(self, line: str) -> list[Reading] | None:
        match = self.pattern.search(line)
        if match is None:
            return None
        out: list[Reading] = []
        for name, text in match.groupdict().items():
            if text:
                value = parse_scalar(text)
                if value is not None:
                    out.append((name, value))
        return out


# --------------------------------------------------------------------------
# NMEA 0183


def nmea_checksum(body: str) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    checksum = 0
    for byte in body.encode("latin-1", "replace"):
        checksum ^= byte
    return checksum


def _nmea_float(text: str, what: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise LineError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LineError(f"{what} {text!r} is not a finite number")
    return value


def _nmea_int(text: str, what: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise LineError(f"{what} {text!r} is not a whole number")
    return int(text)


def _nmea_coordinate(text: str, hemisphere: str, positive: str, negative: str,
                     limit: int) -> float | None:
    """``ddmm.mmmm`` / ``dddmm.mmmm`` plus hemisphere to signed decimal degrees."""
    if not text:
        return None
    dot = text.find(".")
    if dot == -1:
        dot = len(text)
    degrees_text, minutes_text = text[: max(dot - 2, 0)], text[max(dot - 2, 0):]
    if degrees_text and not degrees_text.isdigit():
        raise LineError(f"coordinate {text!r} is not ddmm.mmmm")
    minutes = _nmea_float(minutes_text, "coordinate minutes")
    degrees = int(degrees_text) if degrees_text else 0
    if minutes is None or not 0.0 <= minutes < 60.0:
        raise LineError(f"coordinate {text!r} has bad minutes")
    value = degrees + minutes / 60.0
    if value > limit:
        raise LineError(f"coordinate {text!r} is beyond {limit} degrees")
    if hemisphere == negative:
        return -value
    if hemisphere != positive:
        raise LineError(f"hemisphere {hemisphere!r} is not {positive} or {negative}")
    return value


def _position(fields: list[str], at: int, out: list[Reading]) -> None:
    lat = _nmea_coordinate(fields[at], fields[at + 1], "N", "S", 90)
    lon = _nmea_coordinate(fields[at + 2], fields[at + 3], "E", "W", 180)
    # Half a position is no position: receivers blank both while acquiring.
    if lat is not None and lon is not None:
        out.append(("lat", lat))
        out.append(("lon", lon))


def _put(out: list[Reading], name: str, value: Any) -> None:
    if value is not None:
        out.append((name, value))


def _gga(fields: list[str]) -> list[Reading]:
    # $--GGA,time,lat,N,lon,E,quality,satellites,hdop,alt,M,geoid,M,age,station
    if len(fields) < 11:
        raise LineError(f"GGA has {len(fields) - 1} fields, expected at least 10")
    out: list[Reading] = []
    quality = _nmea_int(fields[6], "fix quality")
    _put(out, "fix_quality", quality)
    _put(out, "satellites", _nmea_int(fields[7], "satellites"))
    _put(out, "hdop", _nmea_float(fields[8], "hdop"))
    if quality:  # 0 (or empty) is "no fix": some receivers repeat a stale position then
        _position(fields, 2, out)
        _put(out, "alt", _nmea_float(fields[9], "altitude"))
    return out


def _rmc(fields: list[str]) -> list[Reading]:
    # $--RMC,time,status,lat,N,lon,E,speed_knots,course,date,magvar,E[,mode[,nav_status]]
    if len(fields) < 10:
        raise LineError(f"RMC has {len(fields) - 1} fields, expected at least 9")
    # Status V ("void") and mode N ("not valid", NMEA 2.3+) mean nothing in the sentence is a fix.
    if fields[2] != "A" or (len(fields) > 12 and fields[12][:1] == "N"):
        return []
    out: list[Reading] = []
    _position(fields, 3, out)
    speed = _nmea_float(fields[7], "speed")
    _put(out, "speed", None if speed is None else speed * KNOTS_TO_MPS)
    _put(out, "course", _nmea_float(fields[8], "course"))
    return out


def _vtg(fields: list[str]) -> list[Reading]:
    # $--VTG,course_true,T,course_magnetic,M,speed_knots,N,speed_kmh,K[,mode]
    if len(fields) < 9:
        raise LineError(f"VTG has {len(fields) - 1} fields, expected at least 8")
    if len(fields) > 9 and fields[9][:1] == "N":
        return []
    out: list[Reading] = []
    knots = _nmea_float(fields[5], "speed")
    if knots is not None:
        out.append(("speed", knots * KNOTS_TO_MPS))
    else:
        kmh = _nmea_float(fields[7], "speed")
        _put(out, "speed", None if kmh is None else kmh / 3.6)
    _put(out, "course", _nmea_float(fields[1], "course"))
    return out


def _zda(fields: list[str]) -> list[Reading]:
    # $--ZDA,time,day,month,year,zone_hours,zone_minutes: a time, no readings
    if len(fields) < 5:
        raise LineError(f"ZDA has {len(fields) - 1} fields, expected at least 4")
    return []


_NMEA_HANDLERS: dict[str, Callable[[list[str]], list[Reading]]] = {
    "GGA": _gga,
    "RMC": _rmc,
    "VTG": _vtg,
    "ZDA": _zda,
}


def _nmea_utc(hhmmss: str, day: int, month: int, year: int) -> float:
    """Unix seconds of an NMEA UTC time of day (``hhmmss.ss``) on a date."""
    if len(hhmmss) < 6 or not hhmmss[:6].isdigit():
        raise LineError(f"time {hhmmss!r} is not hhmmss.ss")
    seconds = _nmea_float(hhmmss[4:], "seconds")
    try:
        midnight = datetime(year, month, day, tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise LineError(f"date {day:02d}.{month:02d}.{year} does not exist") from None
    hours, minutes = int(hhmmss[:2]), int(hhmmss[2:4])
    if hours > 23 or minutes > 59 or seconds is None or not 0 <= seconds < 61:
        raise LineError(f"time {hhmmss!r} is not a time of day")
    return midnight + hours * 3600 + minutes * 60 + seconds


def _rmc_time(fields: list[str]) -> float | None:
    # Only a valid fix: before one, receivers print the time of their own clock.
    date = fields[9]
    if fields[2] != "A" or (len(fields) > 12 and fields[12][:1] == "N") \
            or not fields[1] or not date:
        return None
    if len(date) != 6 or not date.isdigit():
        raise LineError(f"date {date!r} is not ddmmyy")
    yy = int(date[4:])
    # Two-digit years: NMEA's convention is 19yy from 80 on.
    return _nmea_utc(fields[1], int(date[:2]), int(date[2:4]), 1900 + yy if yy >= 80 else 2000 + yy)


def _zda_time(fields: list[str]) -> float | None:
    if not all(fields[1:5]):
        return None  # receivers leave the fields empty until they know the time
    day = _nmea_int(fields[2], "day")
    month = _nmea_int(fields[3], "month")
    year = _nmea_int(fields[4], "year")
    assert day is not None and month is not None and year is not None
    return _nmea_utc(fields[1], day, month, year)


_NMEA_TIMES: dict[str, Callable[[list[str]], float | None]] = {
    "RMC": _rmc_time,
    "ZDA": _zda_time,
}


class NmeaParser(LineParser):
    """NMEA 0183 sentences from a GNSS receiver: GGA, RMC and VTG from any talker (GP, GN, GL...).

    Readings (unprefixed names):

    ========== ====================================================== =========
    lat, lon   decimal degrees, negative south / west (GGA, RMC)      deg
    alt        altitude above mean sea level (GGA)                    m
    speed      speed over ground, converted from knots (RMC, VTG)     m/s
    course     course over ground, true north (RMC, VTG)              deg
    fix_quality GGA quality: 0 none, 1 GPS, 2 DGPS, 4 RTK, 5 float... —
    satellites satellites used (GGA)                                  —
    hdop       horizontal dilution of precision (GGA)                 —
    ========== ====================================================== =========

    An empty field (no fix yet) skips that reading. GGA with fix quality 0
    skips lat/lon/alt; RMC with status ``V`` (or mode ``N``) and VTG with mode
    ``N`` give no readings at all. ZDA gives none either: only a time. Other
    sentence types (GSA, GSV, proprietary ``$P...``) return ``None``.

    After each ``parse``, :attr:`utc` is the sentence's date and time in
    Unix seconds when it carried both (RMC with a valid fix, ZDA with every
    field, both well formed), else None: a time reference for a computer
    without a clock.

    Parameters:
        require_checksum: a sentence without ``*hh`` is a ChecksumError;
            when false it is accepted unchecked (a wrong one is always an error).
    """

    def __init__(self, require_checksum: bool = True) -> None:
        self.require_checksum = require_checksum
        self.utc: float | None = None

    def parse(self, line: str) -> list[Reading] | None:
        self.utc = None
        line = line.strip()
        if not line.startswith("$"):
            raise LineError("not an NMEA sentence: no leading '$'")
        star = line.rfind("*")
        if star == -1:
            if self.require_checksum:
                raise ChecksumError("missing checksum '*hh'")
            body = line[1:]
        else:
            body = line[1:star]
            given = line[star + 1:]
            if len(given) != 2:
                raise ChecksumError(f"checksum {given[:8]!r} is not two hex digits")
            try:
                expected = int(given, 16)
            except ValueError:
                raise ChecksumError(f"checksum {given!r} is not two hex digits") from None
            actual = nmea_checksum(body)
            if actual != expected:
                raise ChecksumError(f"checksum {given} does not match the sentence ({actual:02X})")
        fields = body.split(",")
        address = fields[0]
        # Proprietary sentences ($PUBX, $PMTK...) start with P and carry vendor formats.
        if len(address) != 5 or address[0] == "P":
            return None
        kind = address[2:]
        handler = _NMEA_HANDLERS.get(kind)
        if handler is None:
            return None
        readings = handler(fields)
        timer = _NMEA_TIMES.get(kind)
        if timer is not None:
            try:
                self.utc = timer(fields)
            except LineError:
                pass  # the readings stand; a time that does not parse is no reference
        return readings
