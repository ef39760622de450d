"""Clock safety through real peers, with an injected clock that says 1970 (docs/time.md).

The system clock is a :class:`ManualTime` running with real time but starting
in 1970, as on a board without a real-time clock. The trustworthy time comes
from a real peer: the local receiver's HTTP Date header (asked for with an
empty request), the device WebSocket's ``server_time_ms``, NMEA sentences
through a pty, MAVLink SYSTEM_TIME over UDP.
"""

from __future__ import annotations

import functools
import json
import operator
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from plexus import Plexus
from plexus.adapters.mavlink import MavlinkAdapter, MavlinkOptions
from plexus.adapters.serial import SerialAdapter, SerialOptions
from plexus.buffer import MemoryBuffer
from plexus.clock import Clock, ManualTime
from plexus.pipeline import Pipeline, SourceContext
from plexus.point import Point
from plexus.sinks.base import SendResult, Sink
from plexus.testing import Receiver
from tests.adapters.test_serial import PtyPeer
from tests.support import wait_until

BOOT_WALL = 30.0  # what the system clock says: 30 s into 1970
DAY = 86_400.0
# A GPS time two days behind the real one, so the tests see it is the GPS that stamps. (Not
# ahead: explicit timestamps, which adapters stamping a whole message make, are checked
# against the real system clock, which the process trusts.) The clocks' floor is a year
# back, so the build date, which may be today, does not make it implausible.
GPS_TIME = float(int(time.time() - 2 * DAY)) + 0.5
FLOOR = time.time() - 365 * DAY


def nmea(body: str) -> str:
    checksum = functools.reduce(operator.xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}\r\n"


def rmc(unix_s: float, status: str = "A") -> str:
    t = datetime.fromtimestamp(unix_s, timezone.utc)
    return nmea(f"GPRMC,{t:%H%M%S}.{t.microsecond // 10000:02d},{status},4807.038,N,01131.000,E,"
                f"022.4,084.4,{t:%d%m%y},003.1,W")


GGA = nmea("GPGGA,000000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")


class Collect(Sink):
    type_name = "collect"

    def __init__(self) -> None:
        super().__init__(None, "collect")
        self.points: list[Point] = []

    def send(self, points: list[Point], key: str) -> SendResult:
        self.points.extend(points)
        return SendResult(len(points))


@pytest.fixture
def rig() -> Iterator[tuple[ManualTime, Clock, Pipeline, Collect]]:
    """A pipeline whose system clock says 1970, delivering to a collecting sink."""
    fake = ManualTime(BOOT_WALL)
    clock = Clock(fake, not_before=FLOOR)
    pipeline = Pipeline("rig-01", clock=clock)
    sink = Collect()
    pipeline.add_lane(sink, MemoryBuffer(100_000), batch_size=1, interval=0.05)
    pipeline.start()
    yield fake, clock, pipeline, sink
    pipeline.close(2.0)


def stamps(sink: Collect, metric: str) -> list[int]:
    return [ts for m, _v, ts, _t in list(sink.points) if m == metric]


# --- the platform's Date header, through the local receiver ----------------------------------


def test_the_local_receiver_sends_a_date_header(plexus_receiver: Receiver) -> None:
    before = time.time()
    with httpx.Client() as client:
        r = client.post(f"{plexus_receiver.url}/ingest", json={"source_id": "x", "points": []},
                        headers={"x-api-key": plexus_receiver.api_key})
        refused = client.post(f"{plexus_receiver.url}/ingest", json={"points": []})
    assert r.status_code == 200 and r.json()["count"] == 0
    for answer in (r, refused):
        date = parsedate_to_datetime(answer.headers["date"]).timestamp()
        assert int(before) - 1 <= date <= time.time() + 1
    assert refused.status_code == 401  # an error's answer carries the time too


def test_points_taken_in_1970_reach_the_platform_with_its_time(plexus_receiver: Receiver) -> None:
    clock = Clock(ManualTime(BOOT_WALL))
    px = Plexus(api_key=plexus_receiver.api_key, source_id="rig-01",
                gateway_url=plexus_receiver.url, flush_interval=0.05, clock=clock)
    try:
        before = time.time()
        px.send("temp", 20.0)
        time.sleep(0.3)
        px.send("temp", 21.0)
        # Nothing stamped 1970 leaves: with nothing else to send, the clock asks the
        # receiver for its time with an empty request; the waiting points follow with it.
        assert plexus_receiver.wait_for(2, timeout=15)
        after = time.time()
        px.send("temp", 22.0, timestamp=before - 60)  # explicit: delivered as it is
        assert plexus_receiver.wait_for(3, timeout=15)
    finally:
        px.close(2.0)
    points = {p["value"]: p["timestamp"] for p in plexus_receiver.points}
    assert points[22.0] == int((before - 60) * 1000)
    # A Date header is whole seconds: one answer places the time within about a second.
    assert (before - 1.5) * 1000 <= points[20.0] <= (after + 1.5) * 1000
    assert 200 <= points[21.0] - points[20.0] <= 600  # the 0.3 s between them is kept
    probes = [r for r in plexus_receiver.requests if r.points == 0 and r.status == 200]
    assert probes, "the clock asked for the time with an empty /ingest request"
    status = px.clock.status()
    assert status["references"].get("http-date", 0) >= 1
    assert status["held_total"] == 2 and status["released"] == 2 and status["dropped"] == 0


# --- the device link's server_time_ms ---------------------------------------------------------


def test_the_device_links_server_time_stamps_points(plexus_receiver: Receiver) -> None:
    plexus_receiver.device.clock_skew_ms = 7_000  # the platform's clock, as this test sets it
    clock = Clock(ManualTime(BOOT_WALL))
    px = Plexus(api_key=plexus_receiver.api_key, source_id="rig-01",
                gateway_url="http://127.0.0.1:9",  # nothing answers: no Date header here
                ws_url=plexus_receiver.ws_url, flush_interval=0.05, clock=clock)
    try:
        @px.command("noop")
        def noop(run: Any) -> dict[str, Any]:
            return {}

        assert wait_until(lambda: px.link_state == "up")
        assert wait_until(lambda: clock.status()["basis"] == "device-link")
        now = clock.now()
        assert now is not None and abs(now - (time.time() + 7.0)) < 0.2
        assert clock.status()["uncertainty_s"] < 0.2  # the auth round trip, not a second
    finally:
        px.close(0.5)


# --- NMEA through a pty -----------------------------------------------------------------------


def test_gps_time_from_nmea_stamps_the_points_that_waited_for_it(
        rig: tuple[ManualTime, Clock, Pipeline, Collect]) -> None:
    fake, clock, pipeline, sink = rig
    pty = PtyPeer()
    adapter = SerialAdapter(SerialOptions(port=pty.path, format="nmea", time_source=True),
                            name="gps")
    adapter.start(SourceContext(pipeline))
    try:
        assert wait_until(lambda: adapter.state == "connected")
        pty.write(GGA)
        assert wait_until(lambda: clock.status()["held"] == 6)
        pty.write(rmc(GPS_TIME - 5, status="V"))  # no fix yet: its time is the receiver's guess
        time.sleep(0.5)
        assert clock.status()["state"] == "unknown"
        waited = time.monotonic()
        pty.write(rmc(GPS_TIME))
        assert wait_until(lambda: len(stamps(sink, "gps.course")) == 1)
        since_gga = time.monotonic() - waited + 0.5
        pty.write(GGA)
        assert wait_until(lambda: len(stamps(sink, "gps.alt")) == 2)
    finally:
        adapter.stop(5.0)
        pty.close()
    # The RMC arrived within a second of its time: the middle of that second is used.
    gga_first, gga_next = stamps(sink, "gps.alt")
    assert abs(gga_first - (GPS_TIME + 0.5 - since_gga) * 1000) <= 700
    assert gga_next >= stamps(sink, "gps.course")[0] >= gga_first
    assert all(ts > FLOOR * 1000 for _m, _v, ts, _t in sink.points)  # nothing in 1970
    assert clock.status()["basis"] == "gps"
    assert adapter.health().extra["time_references"] == 1


def test_nmea_time_is_no_reference_unless_the_rig_says_so(
        rig: tuple[ManualTime, Clock, Pipeline, Collect]) -> None:
    _fake, clock, pipeline, sink = rig
    pty = PtyPeer()
    adapter = SerialAdapter(SerialOptions(port=pty.path, format="nmea"), name="gps")
    adapter.start(SourceContext(pipeline))
    try:
        assert wait_until(lambda: adapter.state == "connected")
        pty.write(rmc(GPS_TIME))
        assert wait_until(lambda: clock.status()["held"] == 4)
        time.sleep(0.7)
    finally:
        adapter.stop(5.0)
        pty.close()
    assert clock.status()["state"] == "unknown" and sink.points == []


# --- MAVLink SYSTEM_TIME over UDP -------------------------------------------------------------


SENDER = Path(__file__).parent / "adapters" / "mavlink_sender.py"
HEARTBEAT = {"msg": "HEARTBEAT", "fields": {"type": 2, "autopilot": 3, "base_mode": 81,
                                            "system_status": 3, "mavlink_version": 3}}


def attitude(roll: float) -> dict[str, Any]:
    return {"msg": "ATTITUDE", "fields": {"time_boot_ms": 1000, "roll": roll}}


def test_mavlink_system_time_stamps_the_points_that_waited_for_it(
        rig: tuple[ManualTime, Clock, Pipeline, Collect]) -> None:
    pytest.importorskip("pymavlink")
    from tests.adapters.test_mavlink import free_udp_port

    _fake, clock, pipeline, sink = rig
    port = free_udp_port()
    adapter = MavlinkAdapter(MavlinkOptions(connection=f"udpin:127.0.0.1:{port}",
                                            time_source=True), name="fc")
    adapter.start(SourceContext(pipeline))
    try:
        assert wait_until(lambda: adapter.state == "connected")
        gps_us = int(GPS_TIME * 1_000_000)
        steps = [HEARTBEAT, attitude(0.1),
                 {"msg": "SYSTEM_TIME", "fields": {"time_unix_usec": 0, "time_boot_ms": 1500}},
                 {"sleep": 0.6}, attitude(0.2),
                 {"msg": "SYSTEM_TIME", "fields": {"time_unix_usec": gps_us,
                                                   "time_boot_ms": 2100}},
                 {"sleep": 0.3}, attitude(0.3)]
        subprocess.run([sys.executable, str(SENDER), "--port", str(port), "--steps",
                        json.dumps(steps)], check=True, timeout=60)
        assert wait_until(lambda: len(stamps(sink, "attitude.roll")) == 3)
    finally:
        adapter.stop(5.0)
    rolls = {round(v, 3): ts for m, v, ts, _t in sink.points if m == "attitude.roll"}
    # SYSTEM_TIME's time was true within 0.2 s before it arrived: stamps are within that
    # (and the sender's pauses) of it.
    assert abs(rolls[0.2] - GPS_TIME * 1000) <= 300
    assert abs(rolls[0.1] - (GPS_TIME - 0.6) * 1000) <= 400
    assert abs(rolls[0.3] - (GPS_TIME + 0.3) * 1000) <= 400
    assert clock.status()["basis"] == "mavlink"
    assert adapter.health().extra["time_references"] == 1  # the zero one is no reference
    assert "system_time.time_unix_usec" not in {m for m, *_ in sink.points}
