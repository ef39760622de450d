"""The serial adapter against real peers: a pty pair, socat pty links, a TCP socket:// bridge.

Plus table-driven tests of the pure line parsers in plexus.adapters.lineformats.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import socket
import subprocess
import sys
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from plexus.adapters.lineformats import (
    ChecksumError,
    CsvParser,
    JsonParser,
    KvParser,
    LineError,
    NmeaParser,
    RegexParser,
    nmea_checksum,
    parse_scalar,
    timestamp_seconds,
)
from plexus.adapters.serial import SerialAdapter, SerialOptions
from plexus.errors import AdapterError, ConfigError
from tests.support import CollectingContext, require_binary, wait_until

REPO = Path(__file__).parents[2]
KNOT = 1852 / 3600


def nmea(body: str) -> str:
    """A full sentence with its checksum, computed here independently of the parser."""
    checksum = functools.reduce(operator.xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}\r\n"


# Well-known example sentences with their published checksums.
GGA_MUNICH = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC_MUNICH = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
VTG_EXAMPLE = "$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48"


# --- peers and helpers ---------------------------------------------------------------------


class PtyPeer:
    """The master side of a pty pair; the adapter opens the slave's path."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        # Raw before pyserial gets to it: a cooked pty would echo our writes back.
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)

    def write(self, data: str | bytes) -> None:
        view = data.encode() if isinstance(data, str) else data
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def pty() -> Iterator[PtyPeer]:
    peer = PtyPeer()
    yield peer
    peer.close()


@contextmanager
def running(collector: CollectingContext, port: str, *, connected: bool = True,
            **options: Any) -> Iterator[SerialAdapter]:
    adapter = SerialAdapter(SerialOptions(port=port, **options), name="test-serial")
    adapter.start(collector)
    try:
        # pyserial flushes the input queue on open, so write only once the port is open.
        if connected:
            assert wait_until(lambda: adapter.state == "connected"), adapter.health()
        yield adapter
    finally:
        adapter.stop(timeout=5)
    assert adapter.state == "stopped"
    assert adapter._thread is not None and not adapter._thread.is_alive()


def wait_metric(collector: CollectingContext, metric: str, count: int = 1) -> list[Any]:
    collector.wait_for(lambda c: len(c.metrics().get(metric, [])) >= count)
    return collector.metrics().get(metric, [])


def points_of(collector: CollectingContext, metric: str) -> list[tuple[Any, int]]:
    return [(value, ts) for name, value, ts, _tags in collector.points if name == metric]


# --- NMEA over a pty -----------------------------------------------------------------------


def test_nmea_gga_rmc_give_gps_metrics(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="nmea", baudrate=9600) as adapter:
        pty.write(nmea("GNGGA,092750.00,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,"))
        pty.write(nmea("GNRMC,092750.00,A,5321.6802,N,00630.3372,W,12.5,31.66,280511,,,A"))
        assert wait_metric(collector, "gps.course") == [31.66]
        m = collector.metrics()
        assert m["gps.lat"] == [pytest.approx(53 + 21.6802 / 60)] * 2
        assert m["gps.lon"] == [pytest.approx(-(6 + 30.3372 / 60))] * 2
        assert m["gps.alt"] == [61.7]
        assert m["gps.fix_quality"] == [1]
        assert m["gps.satellites"] == [8]
        assert m["gps.hdop"] == [1.03]
        assert m["gps.speed"] == [pytest.approx(12.5 * KNOT)]
        assert adapter.health().extra["lines"] == 2
        assert adapter.health().extra["bad_lines"] == 0


def test_nmea_corrupted_sentence_is_counted_and_dropped(collector: CollectingContext,
                                                        pty: PtyPeer) -> None:
    good = nmea("GPGGA,001043.00,3352.1234,S,15112.5678,E,2,12,0.8,35.2,M,22.1,M,1.0,0000")
    corrupted = good.replace("35.2,M", "95.2,M")  # a flipped digit, checksum left as it was
    with running(collector, pty.path, format="nmea", prefix="boat.gnss") as adapter:
        pty.write(corrupted)
        pty.write("$GPGGA,001043.00,3352.1234,S,15112.5678,E,2,12,0.8,35.2,M,22.1,M,1.0,0000\r\n")
        pty.write(good)
        assert wait_metric(collector, "boat.gnss.alt") == [35.2]
        extra = adapter.health().extra
        assert extra["bad_checksums"] == 2  # one wrong, one missing
        assert extra["bad_lines"] == 2
        assert adapter.state == "connected"
        m = collector.metrics()
        assert m["boat.gnss.lat"] == [pytest.approx(-(33 + 52.1234 / 60))]
        assert m["boat.gnss.lon"] == [pytest.approx(151 + 12.5678 / 60)]
        assert m["boat.gnss.fix_quality"] == [2]


def test_nmea_without_fix_skips_position(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="nmea") as adapter:
        pty.write(nmea("GPGGA,235947.000,,,,,0,00,,,M,,M,,"))
        pty.write(nmea("GPRMC,235947.000,V,,,,,,,,,,N"))
        pty.write(nmea("GPGSV,1,1,00"))  # not decoded: ignored, not bad
        pty.write(nmea("GPGGA,235948.000,4807.038,N,01131.000,E,1,05,1.9,545.4,M,46.9,M,,"))
        assert wait_metric(collector, "gps.lat") == [pytest.approx(48.1173)]
        m = collector.metrics()
        assert m["gps.fix_quality"] == [0, 1]
        assert m["gps.satellites"] == [0, 5]
        assert "gps.speed" not in m
        extra = adapter.health().extra
        assert extra["bad_lines"] == 0
        assert extra["ignored_lines"] == 1


# --- other formats over a pty --------------------------------------------------------------


def test_json_lines(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, timestamp_field="meta.ts") as adapter:
        pty.write(b'{"temp": 21.5, "imu": {"ax": 0.1, "ay": -2}, "ok": true, "mode": "cruise",'
                  b' "cells": [3.7, 3.8], "gone": null, "meta": {"ts": 1700000000123}}\r\n')
        pty.write('{"temp": 22.0, "meta": {"ts": 1700000001.5}}\n')
        pty.write("[1, 2]\n")  # valid JSON but not an object: bad
        pty.write('{"temp": 23.0}\n')  # no timestamp: receive time, counted
        assert wait_metric(collector, "temp", 3) == [21.5, 22.0, 23.0]
        m = collector.metrics()
        assert m["imu.ax"] == [0.1] and m["imu.ay"] == [-2]
        assert m["ok"] == [True] and m["mode"] == ["cruise"] and m["cells"] == [[3.7, 3.8]]
        assert "gone" not in m and "meta.ts" not in m
        times = [ts for _value, ts in points_of(collector, "temp")]
        assert times[:2] == [1700000000123, 1700000001500]
        assert times[2] > 1700000001500
        extra = adapter.health().extra
        assert extra["bad_lines"] == 1
        assert extra["bad_timestamps"] == 1


def test_csv_with_header_line(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="csv", timestamp_field="time",
                 prefix="env") as adapter:
        pty.write("time,temp,hum,state\r\n")
        pty.write("1700000000,21.5,40,ok\r\n")
        pty.write("time,temp,hum,state\r\n")  # the board reset and printed its header again
        pty.write("1700000001,,41,warn\r\n")  # an empty cell skips that column
        pty.write("1700000002,22.5\r\n")  # too few cells: bad
        pty.write('1700000003,23.5,42,"a, b"\r\n')
        assert wait_metric(collector, "env.state", 3) == ["ok", "warn", "a, b"]
        m = collector.metrics()
        assert m["env.temp"] == [21.5, 23.5]
        assert m["env.hum"] == [40, 41, 42]
        assert "env.time" not in m
        assert [ts for _v, ts in points_of(collector, "env.hum")] == [
            1700000000000, 1700000001000, 1700000003000]
        extra = adapter.health().extra
        assert extra["bad_lines"] == 1
        assert extra["ignored_lines"] == 2


def test_csv_with_columns_option(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="csv", columns=["rpm", "", "volts"],
                 delimiter=";"):
        pty.write("1200;skip-me;12.6\n")
        pty.write("1250;x;12.5\n")
        assert wait_metric(collector, "volts", 2) == [12.6, 12.5]
        assert collector.metrics()["rpm"] == [1200, 1250]
        assert set(collector.metrics()) == {"rpm", "volts"}


def test_kv_lines(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="kv") as adapter:
        pty.write("temp=21.5 hum=40,door=open armed=TRUE\n")
        pty.write("READY\n")  # no pair at all: bad
        pty.write("temp=nan hum=41\n")  # a failed sensor read is skipped
        assert wait_metric(collector, "hum", 2) == [40, 41]
        m = collector.metrics()
        assert m["temp"] == [21.5]
        assert m["door"] == ["open"] and m["armed"] == [True]
        assert adapter.health().extra["bad_lines"] == 1


def test_kv_with_colon_separator(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="kv", kv_separator=":"):
        pty.write("T: 21.5, H: 40\r\n")
        assert wait_metric(collector, "H") == [40]
        assert collector.metrics()["T"] == [21.5]


def test_regex_lines(collector: CollectingContext, pty: PtyPeer) -> None:
    pattern = r"^(?P<timestamp>\d+) Temp: (?P<temp>[-\d.]+) C(?: Hum: (?P<hum>[\d.]+) %)?$"
    with running(collector, pty.path, format="regex", pattern=pattern) as adapter:
        pty.write("booting v1.2...\n")  # not matched: ignored
        pty.write("1700000000 Temp: -3.25 C Hum: 40.5 %\n")
        pty.write("1700000001000 Temp: -3.5 C\n")  # ms, and the optional group is absent
        assert wait_metric(collector, "temp", 2) == [-3.25, -3.5]
        assert collector.metrics()["hum"] == [40.5]
        assert [ts for _v, ts in points_of(collector, "temp")] == [1700000000000, 1700000001000]
        extra = adapter.health().extra
        assert extra["ignored_lines"] == 1 and extra["bad_lines"] == 0


# --- bad input never stops the adapter -----------------------------------------------------


def test_binary_noise_and_overlong_lines_are_counted(collector: CollectingContext,
                                                      pty: PtyPeer) -> None:
    with running(collector, pty.path, max_line_bytes=256) as adapter:
        pty.write(b"\x00\xff\xfe\x80\x81garbage\n")  # not UTF-8
        pty.write(b"\x01\x02\x03 not json\n")
        pty.write(b"x" * 5000)  # no terminator for a long time: dropped up to the next one
        pty.write(b'xxxx{"a": 1}\n')
        pty.write(b'{"b": "' + b"y" * 300 + b'"}\n')  # too long even in one piece
        pty.write(bytes(range(256)) * 4)  # raw noise, some of it terminators
        pty.write(b'\n{"ok": 1}\n')
        assert wait_metric(collector, "ok") == [1]
        m = collector.metrics()
        assert "a" not in m and "b" not in m
        extra = adapter.health().extra
        assert extra["overlong_lines"] >= 2
        assert extra["bad_lines"] >= 4
        assert adapter.state == "connected"
        assert adapter.errors >= extra["bad_lines"]


def test_line_terminator_and_encoding(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="kv", line_terminator="\r", encoding="latin-1"):
        pty.write("temp=21.5\r\nname=caf\xe9\r\n".encode("latin-1"))
        assert wait_metric(collector, "name") == ["café"]
        assert collector.metrics()["temp"] == [21.5]


def test_discard_first_line(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path, format="kv", discard_first_line=True):
        pty.write("mp=21.5\ntemp=22\n")  # the cut-off first line must not become metric "mp"
        assert wait_metric(collector, "temp") == [22]
        assert "mp" not in collector.metrics()


# --- link loss and reopen ------------------------------------------------------------------


class SocatPair:
    """Two linked ptys made by socat; ``device`` for the adapter, ``peer`` for the test."""

    def __init__(self, socat: str, directory: Path) -> None:
        self.socat = socat
        self.device = directory / "ttyDEV"
        self.peer = directory / "ttyPEER"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.socat, f"pty,raw,echo=0,link={self.device}",
             f"pty,raw,echo=0,link={self.peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: self.device.exists() and self.peer.exists())
        self.fd = os.open(self.peer, os.O_RDWR | os.O_NOCTTY)

    def write(self, data: str) -> None:
        assert self.fd is not None
        os.write(self.fd, data.encode())

    def stop(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def test_unplugged_port_is_reopened(collector: CollectingContext, tmp_path: Path) -> None:
    pair = SocatPair(require_binary("socat"), tmp_path)
    try:
        # The device is missing at start: retried in the background, start() does not fail.
        with running(collector, str(pair.device), connected=False, format="kv") as adapter:
            assert wait_until(lambda: adapter.errors > 0)
            assert adapter.state in ("starting", "reconnecting")
            pair.start()
            assert wait_until(lambda: adapter.state == "connected")
            opened = adapter.health().extra["reopens"]
            pair.write("n=1\n")
            assert wait_metric(collector, "n") == [1]

            pair.stop()  # unplugged
            assert wait_until(lambda: adapter.state == "reconnecting"), adapter.health()
            pair.start()  # plugged back in, same path
            assert wait_until(lambda: adapter.state == "connected"), adapter.health()
            pair.write("n=2\n")
            assert wait_metric(collector, "n", 2) == [1, 2]
            assert adapter.health().extra["reopens"] == opened + 1
    finally:
        pair.stop()


def test_socket_url_reconnects_after_the_bridge_drops(collector: CollectingContext) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        host, port = server.getsockname()
        with running(collector, f"socket://{host}:{port}", connected=False,
                     format="csv", columns=["a", "b"]) as adapter:
            conn, _ = server.accept()
            with conn:
                # pyserial's open() drains what already arrived: send once it has returned.
                assert wait_until(lambda: adapter.state == "connected")
                conn.sendall(b"1,2\n3,4\n")
                assert wait_metric(collector, "b", 2) == [2, 4]
            # The bridge dropped the connection: the adapter reopens the URL.
            conn, _ = server.accept()
            with conn:
                assert wait_until(lambda: adapter.state == "connected")
                conn.sendall(b"5,6\n")
                assert wait_metric(collector, "b", 3) == [2, 4, 6]
                assert adapter.health().extra["reopens"] == 1


def test_stop_while_idle_ends_the_reader(collector: CollectingContext, pty: PtyPeer) -> None:
    with running(collector, pty.path) as adapter:
        pass
    assert adapter.state == "stopped"
    assert adapter._port is None


# --- start, options and packaging ----------------------------------------------------------


def test_import_does_not_import_pyserial() -> None:
    code = ("import sys, plexus.adapters.serial, plexus.adapters.lineformats; "
            "sys.exit('serial' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_unknown_url_scheme_fails_at_start(collector: CollectingContext) -> None:
    adapter = SerialAdapter(SerialOptions(port="nosuch://somewhere"))
    with pytest.raises(AdapterError, match="nosuch"):
        adapter.start(collector)


@pytest.mark.parametrize("options, message", [
    ({"bytesize": 9}, "bytesize"),
    ({"stopbits": 3}, "stopbits"),
    ({"encoding": "no-such-codec"}, "encoding"),
    ({"line_terminator": ""}, "line_terminator"),
    ({"max_line_bytes": 0}, "max_line_bytes"),
    ({"format": "regex"}, "pattern"),
    ({"format": "regex", "pattern": "(unclosed"}, "regular expression"),
    ({"format": "regex", "pattern": r"\d+"}, "named group"),
    ({"pattern": "(?P<a>.)"}, "pattern: only used with format: regex"),
    ({"format": "kv", "kv_separator": " "}, "separator"),
    ({"format": "csv", "delimiter": ";;"}, "delimiter"),
    ({"format": "nmea", "timestamp_field": "t"}, "timestamp_field"),
])
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SerialOptions(port="/dev/ttyUSB0", **options)


def test_health_extra_counters(pty: PtyPeer) -> None:
    extra = SerialAdapter(SerialOptions(port=pty.path)).health().extra
    assert set(extra) == {"port", "lines", "bad_lines", "bad_checksums", "overlong_lines",
                          "bad_timestamps", "ignored_lines", "reopens"}


def test_sample_config_loads_and_documents_every_option() -> None:
    from plexus.config import load_config
    from plexus.sinks.stdout import StdoutSink

    path = REPO / "configs" / "serial.yaml"
    config = load_config(path, adapter_types={"serial": SerialAdapter},
                         sink_types={"stdout": StdoutSink},
                         environ={"PLEXUS_API_KEY": "plx_x"})
    gps, arduino = config.adapters
    assert gps.options == SerialOptions(port="/dev/ttyACM0", baudrate=9600, format="nmea")
    assert arduino.options.columns == ["temp", "hum", "pressure"]
    text = path.read_text()
    for f in dataclasses.fields(SerialOptions):
        assert f"# {f.name}:" in text, f"configs/serial.yaml does not document {f.name}"
        assert f.metadata.get("help"), f.name


# --- lineformats: pure parsers, table-driven -----------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("42", 42), ("-7", -7), ("+3", 3), ("3.25", 3.25), ("-.5", -0.5), ("1e3", 1000.0),
    (" 12 ", 12), ("true", True), ("FALSE", False), ("open", "open"), ("1_000", "1_000"),
    ("0x10", "0x10"), ("12abc", "12abc"), ("", None), ("  ", None), ("nan", None),
    ("-inf", None), ("Infinity", None), ("1e999", None),
])
def test_parse_scalar(text: str, expected: Any) -> None:
    value = parse_scalar(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw, seconds", [
    (1700000000, 1700000000.0), (1700000000.25, 1700000000.25), (1700000000123, 1700000000.123),
    (1700000000123456, 1700000000.123456), (1700000000123456789, 1700000000.123456789),
    ("1700000000", 1700000000.0), ("2023-11-14T22:13:20Z", 1700000000.0),
    ("2023-11-14T23:13:20+01:00", 1700000000.0), ("2023-11-14 22:13:20", 1700000000.0),
])
def test_timestamp_seconds(raw: Any, seconds: float) -> None:
    assert timestamp_seconds(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["soon", True, math.nan, None, [1]])
def test_timestamp_seconds_rejects(raw: Any) -> None:
    with pytest.raises(LineError):
        timestamp_seconds(raw)


@pytest.mark.parametrize("sentence, checksum", [
    (GGA_MUNICH, 0x47), (RMC_MUNICH, 0x6A), (VTG_EXAMPLE, 0x48),
])
def test_nmea_checksum_of_published_examples(sentence: str, checksum: int) -> None:
    assert nmea_checksum(sentence[1:sentence.index("*")]) == checksum


MUNICH_LAT = 48 + 7.038 / 60
MUNICH_LON = 11 + 31.0 / 60


@pytest.mark.parametrize("line, expected", [
    (GGA_MUNICH, {"fix_quality": 1, "satellites": 8, "hdop": 0.9, "lat": MUNICH_LAT,
                  "lon": MUNICH_LON, "alt": 545.4}),
    (RMC_MUNICH, {"lat": MUNICH_LAT, "lon": MUNICH_LON, "speed": 22.4 * KNOT, "course": 84.4}),
    (VTG_EXAMPLE, {"speed": 5.5 * KNOT, "course": 54.7}),
    # Other talkers, southern/western hemispheres, lower-case checksum digits.
    ("$GLGGA,1,0012.000,S,00030.000,W,4,20,0.5,-10.6,M,,,,*2b",
     {"fix_quality": 4, "satellites": 20, "hdop": 0.5, "lat": -0.2, "lon": -0.5, "alt": -10.6}),
    (nmea("GARMC,1,A,8959.999,N,17959.999,E,0.0,,010125,,,D").strip(),
     {"lat": 89 + 59.999 / 60, "lon": 179 + 59.999 / 60, "speed": 0.0}),
    # No fix: empty fields skipped, no position.
    (nmea("GPGGA,235947.000,,,,,0,00,,,M,,M,,").strip(), {"fix_quality": 0, "satellites": 0}),
    (nmea("GPGGA,235947.000,4807.038,N,01131.000,E,0,03,9.9,545.4,M,,M,,").strip(),
     {"fix_quality": 0, "satellites": 3, "hdop": 9.9}),
    (nmea("GNRMC,235947.000,V,,,,,,,,,,N").strip(), {}),
    (nmea("GNRMC,235947.000,A,4807.038,N,01131.000,E,1.0,2.0,010125,,,N").strip(), {}),
    (nmea("GPVTG,,T,,M,,N,36.0,K,A").strip(), {"speed": 10.0}),
    (nmea("GPVTG,,T,,M,,N,,K,N").strip(), {}),
])
def test_nmea_parser_readings(line: str, expected: dict[str, Any]) -> None:
    readings = NmeaParser().parse(line)
    assert readings is not None
    assert dict(readings) == pytest.approx(expected)
    assert len(readings) == len(expected)


@pytest.mark.parametrize("line", [
    nmea("GPGSV,3,1,11,03,03,111,00").strip(), nmea("PUBX,00,081350.00").strip(),
    nmea("GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1").strip(),
])
def test_nmea_parser_ignores_other_sentences(line: str) -> None:
    assert NmeaParser().parse(line) is None


@pytest.mark.parametrize("line, error", [
    (GGA_MUNICH.replace("*47", "*48"), ChecksumError),
    (GGA_MUNICH.replace("545.4", "545.5"), ChecksumError),
    (GGA_MUNICH[: GGA_MUNICH.index("*")], ChecksumError),
    (GGA_MUNICH.replace("*47", "*4"), ChecksumError),
    (GGA_MUNICH.replace("*47", "*ZZ"), ChecksumError),
    ("GPGGA,123519", LineError),
    ("", LineError),
    (nmea("GPGGA,1,4807.038,X,01131.000,E,1,08,0.9,545.4,M,,M,,").strip(), LineError),
    (nmea("GPGGA,1,4867.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,").strip(), LineError),
    (nmea("GPGGA,1,9107.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,").strip(), LineError),
    (nmea("GPGGA,1,48a7.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,").strip(), LineError),
    (nmea("GPGGA,1,4807.038,N,01131.000,E,one,08,0.9,545.4,M,,M,,").strip(), LineError),
    (nmea("GPGGA,1,4807.038,N,01131.000,E,1,08,nan,545.4,M,,M,,").strip(), LineError),
    (nmea("GPRMC,1,A,4807.038").strip(), LineError),
])
def test_nmea_parser_rejects(line: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        NmeaParser().parse(line)


def test_nmea_checksum_optional() -> None:
    body = GGA_MUNICH[: GGA_MUNICH.index("*")]
    readings = NmeaParser(require_checksum=False).parse(body)
    assert readings is not None and dict(readings)["alt"] == 545.4
    with pytest.raises(ChecksumError):  # a wrong checksum is never accepted
        NmeaParser(require_checksum=False).parse(GGA_MUNICH.replace("*47", "*00"))


@pytest.mark.parametrize("line, expected", [
    ('{"a": 1, "b": {"c": 2.5, "d": {"e": "x"}}}', [("a", 1), ("b.c", 2.5), ("b.d.e", "x")]),
    ('{"list": [1, {"k": 2}], "n": null, "t": false}', [("list", [1, {"k": 2}]), ("t", False)]),
    ('{"s": "42"}', [("s", "42")]),
    ("{}", []),
])
def test_json_parser(line: str, expected: list[tuple[str, Any]]) -> None:
    assert JsonParser().parse(line) == expected


@pytest.mark.parametrize("line", ["[1, 2]", "42", '"text"', "{bad", '{"a": NaN}', ""])
def test_json_parser_rejects(line: str) -> None:
    with pytest.raises(LineError):
        JsonParser().parse(line)


def test_csv_parser_header_then_rows() -> None:
    parser = CsvParser()
    assert parser.parse(" t , v ,name") is None
    assert parser.parse("1,2.5,x") == [("t", 1), ("v", 2.5), ("name", "x")]
    assert parser.parse("t,v,name") is None
    assert parser.parse('2,,"a,b"') == [("t", 2), ("name", "a,b")]
    with pytest.raises(LineError):
        parser.parse("1,2")
    with pytest.raises(LineError):
        parser.parse('1,2,"unclosed')


@pytest.mark.parametrize("separator, line, expected", [
    ("=", "a=1 b=2.5", [("a", 1), ("b", 2.5)]),
    ("=", "a=1,b=x, c = true", [("a", 1), ("b", "x"), ("c", True)]),
    ("=", "status OK a=1", [("a", 1)]),
    ("=", "a= b=2", [("a", "b=2")]),  # a space after an empty value: documented limitation
    ("=", "a=,b=2", [("b", 2)]),
    (":", "T: 21.5, H: 40", [("T", 21.5), ("H", 40)]),
    ("=>", "x=>1 y=>2", [("x", 1), ("y", 2)]),
])
def test_kv_parser(separator: str, line: str, expected: list[tuple[str, Any]]) -> None:
    assert KvParser(separator).parse(line) == expected


@pytest.mark.parametrize("line", ["READY", "", "a b c"])
def test_kv_parser_rejects(line: str) -> None:
    with pytest.raises(LineError):
        KvParser().parse(line)


@pytest.mark.parametrize("line, expected", [
    ("id=0042 t=21.5", [("id", 42), ("t", 21.5)]),
    ("id=abc t=", [("id", "abc")]),
    ("nothing here", None),
])
def test_regex_parser(line: str, expected: list[tuple[str, Any]] | None) -> None:
    assert RegexParser(r"id=(?P<id>\w+) t=(?P<t>[\d.]*)").parse(line) == expected
