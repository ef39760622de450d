"""MavlinkAdapter against a real pymavlink sender process over UDP loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.adapters.mavlink import MavlinkAdapter, MavlinkOptions
from plexus.errors import AdapterError
from tests.support import CollectingContext
from tests.support import wait_until as wait

pytest.importorskip("pymavlink")

SENDER = Path(__file__).with_name("mavlink_sender.py")

# An ArduCopter-like autopilot heartbeat: MAV_TYPE_QUADROTOR, MAV_AUTOPILOT_ARDUPILOTMEGA,
# base_mode = CUSTOM_MODE_ENABLED | STABILIZE_ENABLED | MANUAL_INPUT_ENABLED.
DISARMED: dict[str, Any] = {"msg": "HEARTBEAT", "fields": {"type": 2, "autopilot": 3, "base_mode": 81,
                                           "custom_mode": 0, "system_status": 3,
                                           "mavlink_version": 3}}
ARMED = {"msg": "HEARTBEAT", "fields": {**DISARMED["fields"], "base_mode": 81 | 128,
                                        "system_status": 4}}
# A ground station that (oddly) sets the armed bit: must not start a flight.
GCS_ARMED = {"msg": "HEARTBEAT", "system": 255, "component": 190,
             "fields": {"type": 6, "autopilot": 8, "base_mode": 128}}


def attitude(roll: float, **extra: Any) -> dict[str, Any]:
    return {"msg": "ATTITUDE", "fields": {"time_boot_ms": 1000, "roll": roll, "pitch": -0.25,
                                          "yaw": 1.5, "rollspeed": 0.01, "pitchspeed": 0.02,
                                          "yawspeed": 0.03}, **extra}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sender_command(port: int, steps: list[dict[str, Any]]) -> list[str]:
    return [sys.executable, str(SENDER), "--port", str(port), "--steps", json.dumps(steps)]


def send(port: int, steps: list[dict[str, Any]]) -> None:
    """Run the sender process to completion."""
    subprocess.run(sender_command(port, steps), check=True, timeout=60)


Start = Callable[..., tuple[MavlinkAdapter, int]]


@pytest.fixture
def start_adapter(collector: CollectingContext) -> Iterator[Start]:
    """Start a MavlinkAdapter listening on a free UDP port; stopped at teardown."""
    started: list[MavlinkAdapter] = []

    def _start(**options: Any) -> tuple[MavlinkAdapter, int]:
        port = free_udp_port()
        adapter = MavlinkAdapter(
            MavlinkOptions(connection=f"udpin:127.0.0.1:{port}", **options), name="fc"
        )
        adapter.start(collector)
        started.append(adapter)
        assert wait(lambda: adapter.state == "connected"), adapter.health()
        return adapter, port

    yield _start
    for adapter in started:
        adapter.stop(5.0)
        assert adapter.state == "stopped"


def points_of(collector: CollectingContext, metric: str) -> list[tuple[Any, int, Any]]:
    return [(v, ts, tags) for m, v, ts, tags in collector.points if m == metric]


def test_fields_arrive_named_converted_and_tagged(
    start_adapter: Start, collector: CollectingContext
) -> None:
    adapter, port = start_adapter()
    before = time.time()
    send(port, [
        DISARMED,
        attitude(0.5),
        {"msg": "GLOBAL_POSITION_INT", "fields": {
            "time_boot_ms": 2000, "lat": 473977420, "lon": 85455940, "alt": 488120,
            "relative_alt": 10500, "vx": 150, "vy": -250, "vz": 0, "hdg": 9000}},
        {"msg": "BATTERY_STATUS", "fields": {
            "id": 1, "temperature": 2500, "voltages": [4100, 4050, 4000] + [65535] * 7,
            "current_battery": 1250, "current_consumed": -1, "battery_remaining": 80}},
        {"msg": "VFR_HUD", "fields": {"airspeed": float("nan"), "groundspeed": 12.5,
                                      "heading": 90, "throttle": 40, "alt": 10.0}},
        attitude(0.6),
    ])
    assert collector.wait_for(lambda c: 0.6 in [pytest.approx(v) for v in
                                                 c.metrics().get("attitude.roll", [])])
    m = collector.metrics()

    assert m["attitude.roll"] == [pytest.approx(0.5), pytest.approx(0.6)]
    assert m["attitude.pitch"][0] == pytest.approx(-0.25)
    assert m["attitude.time_boot_ms"][0] == 1000
    # degE7 -> deg, mm -> m, cm/s -> m/s, cdeg -> deg
    assert m["global_position_int.lat"] == [pytest.approx(47.397742)]
    assert m["global_position_int.lon"] == [pytest.approx(8.545594)]
    assert m["global_position_int.alt"] == [pytest.approx(488.12)]
    assert m["global_position_int.relative_alt"] == [pytest.approx(10.5)]
    assert m["global_position_int.vx"] == [pytest.approx(1.5)]
    assert m["global_position_int.vy"] == [pytest.approx(-2.5)]
    assert m["global_position_int.hdg"] == [pytest.approx(90.0)]
    # mV -> V per cell, UINT16_MAX cells skipped; cA -> A; cdegC -> degC
    assert m["battery_status.voltages.0"] == [pytest.approx(4.1)]
    assert m["battery_status.voltages.2"] == [pytest.approx(4.0)]
    assert "battery_status.voltages.3" not in m
    assert m["battery_status.current_battery"] == [pytest.approx(12.5)]
    assert m["battery_status.temperature"] == [pytest.approx(25.0)]
    assert m["battery_status.battery_remaining"] == [80]
    assert "battery_status.current_consumed" not in m  # -1: not measured
    # NaN means "unknown": skipped, the rest of the message still arrives
    assert "vfr_hud.airspeed" not in m
    assert m["vfr_hud.groundspeed"] == [pytest.approx(12.5)]
    # enums stay numbers; armed flag as a bool
    assert m["heartbeat.type"] == [2]
    assert m["heartbeat.base_mode"] == [81]
    assert m["heartbeat.armed"] == [False]

    for metric, _value, ts, tags in collector.points:
        assert tags is not None
        assert tags["system_id"] == "1" and tags["component_id"] == "1", metric
        assert before - 1 <= ts / 1000 <= time.time() + 1  # receive time, wall clock
    (_v, _ts, battery_tags), = points_of(collector, "battery_status.voltages.0")
    assert battery_tags["instance"] == "1"

    extra = adapter.health().extra
    assert extra["messages"] == 6
    assert extra["link"] == "up"
    assert extra["bad_crc"] == 0 and extra["seq_gaps"] == 0
    assert adapter.errors == 0


def test_convert_units_off_keeps_raw_integers(
    start_adapter: Start, collector: CollectingContext
) -> None:
    _adapter, port = start_adapter(convert_units=False)
    send(port, [{"msg": "GLOBAL_POSITION_INT", "fields": {"lat": 473977420, "alt": 488120,
                                                           "hdg": 65535}}])
    assert collector.wait_for(lambda c: "global_position_int.lat" in c.metrics())
    m = collector.metrics()
    assert m["global_position_int.lat"] == [473977420]
    assert m["global_position_int.alt"] == [488120]
    assert "global_position_int.hdg" not in m  # UINT16_MAX: heading unknown


@pytest.mark.parametrize("mavlink2", [True, False])
def test_mavlink1_packets_decode(
    start_adapter: Start, collector: CollectingContext, mavlink2: bool
) -> None:
    _adapter, port = start_adapter(mavlink2=mavlink2)
    send(port, [{**DISARMED, "mavlink1": True}, attitude(0.25, mavlink1=True)])
    assert collector.wait_for(lambda c: "attitude.roll" in c.metrics())
    m = collector.metrics()
    assert m["attitude.roll"] == [pytest.approx(0.25)]
    assert m["heartbeat.autopilot"] == [3]


def test_allow_list_is_respected(start_adapter: Start, collector: CollectingContext) -> None:
    adapter, port = start_adapter(messages=["attitude"])
    send(port, [
        DISARMED,
        {"msg": "VFR_HUD", "fields": {"groundspeed": 3.0}},
        {"msg": "STATUSTEXT", "fields": {"severity": 6, "text": "hello"}},
        attitude(0.1),
    ])
    assert collector.wait_for(lambda c: "attitude.roll" in c.metrics())
    assert {metric.split(".")[0] for metric in collector.metrics()} == {"attitude"}
    # HEARTBEAT still drives the link state even when not emitted
    assert adapter.health().extra["link"] == "up"
    assert adapter.health().extra["messages"] == 4


def test_star_allows_every_message_and_strings_become_events(
    start_adapter: Start, collector: CollectingContext
) -> None:
    _adapter, port = start_adapter(messages=["*"])
    send(port, [
        {"msg": "STATUSTEXT", "fields": {"severity": 4, "text": "PreArm: Check fence"}},
        {"msg": "SCALED_PRESSURE", "fields": {"press_abs": 1013.25, "temperature": 2150}},
    ])
    assert collector.wait_for(lambda c: "scaled_pressure.temperature" in c.metrics())
    m = collector.metrics()
    assert m["statustext.text"] == ["PreArm: Check fence"]
    assert m["statustext.severity"] == [4]
    assert m["scaled_pressure.press_abs"] == [pytest.approx(1013.25)]
    assert m["scaled_pressure.temperature"] == [pytest.approx(21.5)]  # cdegC -> degC


def test_unknown_message_in_allow_list_fails_start(collector: CollectingContext) -> None:
    adapter = MavlinkAdapter(MavlinkOptions(connection="udpin:127.0.0.1:0",
                                            messages=["ATTITUDE", "ATTITUDES"]))
    with pytest.raises(AdapterError, match="ATTITUDES"):
        adapter.start(collector)


def test_unknown_dialect_fails_start(collector: CollectingContext) -> None:
    adapter = MavlinkAdapter(MavlinkOptions(connection="udpin:127.0.0.1:0",
                                            dialect="no_such_dialect"))
    with pytest.raises(AdapterError, match="no_such_dialect"):
        adapter.start(collector)


def test_a_flight_session_nests_inside_a_session_already_open(
    start_adapter: Start, collector: CollectingContext
) -> None:
    """A gateway with ``session:`` set has a session open when the vehicle arms: the
    flight's session is the inner one while armed, and the gateway's is back after."""
    collector.begin_session("bench-run", {"operator": "ana"})
    adapter, port = start_adapter(auto_session=True)
    send(port, [DISARMED, attitude(0.1), ARMED, attitude(0.2), DISARMED, attitude(0.3)])
    assert collector.wait_for(lambda c: len(c.metrics().get("attitude.roll", [])) == 3)
    flight = collector.sessions[1][1]
    assert flight.startswith("flight-")
    session_tags = ("operator", "session_id", "vehicle_system_id", "vehicle_type")
    tags = {round(v, 3): {k: t[k] for k in session_tags if k in t}
            for v, _ts, t in points_of(collector, "attitude.roll")}
    assert tags[0.1] == {"operator": "ana", "session_id": "bench-run"}
    assert tags[0.2] == {"operator": "ana", "session_id": flight, "vehicle_system_id": "1",
                         "vehicle_type": "2"}
    assert tags[0.3] == {"operator": "ana", "session_id": "bench-run"}
    assert collector.current_session == "bench-run"


def test_arm_and_disarm_begin_and_end_a_session(
    start_adapter: Start, collector: CollectingContext
) -> None:
    adapter, port = start_adapter(auto_session=True)
    send(port, [
        DISARMED, attitude(0.1),
        GCS_ARMED, attitude(0.15),
        ARMED, attitude(0.2),
        ARMED, attitude(0.25),
        DISARMED, attitude(0.3),
    ])
    assert collector.wait_for(lambda c: len(c.metrics().get("attitude.roll", [])) == 5)

    assert [(kind, tags) for kind, _sid, tags in collector.sessions] == [
        ("begin", {"vehicle_system_id": "1", "vehicle_type": "2"}), ("end", None)]
    session_id = collector.sessions[0][1]
    assert collector.sessions[1][1] == session_id
    assert re.fullmatch(r"flight-\d{8}-\d{6}-sys1", session_id)

    in_session = {round(v, 3): (tags or {}).get("session_id")
                  for v, _ts, tags in points_of(collector, "attitude.roll")}
    assert in_session == {0.1: None, 0.15: None, 0.2: session_id, 0.25: session_id, 0.3: None}
    # the arming and the disarming heartbeat both belong to the flight
    armed = [(v, (tags or {}).get("session_id"))
             for v, _ts, tags in points_of(collector, "heartbeat.armed") if tags
             and tags["system_id"] == "1"]
    assert armed == [(False, None), (True, session_id), (True, session_id),
                     (False, session_id)]
    assert adapter.health().extra["session"] is None


def test_bad_crc_and_noise_are_counted_and_reading_goes_on(
    start_adapter: Start, collector: CollectingContext
) -> None:
    adapter, port = start_adapter()
    send(port, [
        DISARMED,
        attitude(0.9, corrupt=True),
        {"noise": 300, "seed": 7},
        {"noise": 40, "seed": 8},
        attitude(0.7, count=20, interval=0.005),
    ])
    assert collector.wait_for(lambda c: 0.7 in [round(v, 3) for v in
                                                 c.metrics().get("attitude.roll", [])])
    extra = adapter.health().extra
    assert extra["bad_crc"] >= 1
    assert extra["bad_data"] >= 1
    assert adapter.errors >= 2
    assert adapter.state == "connected"
    assert 0.9 not in [round(v, 3) for v in collector.metrics()["attitude.roll"]]


def test_sequence_gaps_are_counted(start_adapter: Start, collector: CollectingContext) -> None:
    adapter, port = start_adapter()
    send(port, [
        DISARMED, attitude(0.1),
        {"skip_seq": 3}, attitude(0.2),
        {"skip_seq": 10}, attitude(0.3),
        attitude(0.4),
    ])
    assert collector.wait_for(lambda c: len(c.metrics().get("attitude.roll", [])) == 4)
    extra = adapter.health().extra
    assert extra["seq_gaps"] == 2
    assert extra["lost_packets"] == 13


def test_link_loss_is_reported_ends_the_flight_and_recovers(
    start_adapter: Start, collector: CollectingContext
) -> None:
    adapter, port = start_adapter(link_timeout=0.5, auto_session=True)
    send(port, [{**ARMED, "count": 3, "interval": 0.05}])

    # the sender has exited: no heartbeat any more
    assert wait(lambda: adapter.health().state == "link_lost")
    health = adapter.health()
    assert health.extra["link"] == "lost"
    assert health.extra["link_losses"] == 1
    assert "HEARTBEAT" in (health.last_error or "")
    # the flight that began with the armed heartbeats ended with the link
    assert [kind for kind, _sid, _tags in collector.sessions] == ["begin", "end"]
    assert health.extra["session"] is None

    # the adapter reopened the port: a vehicle heard again brings the link back
    sender = subprocess.Popen(sender_command(port, [{**DISARMED, "count": 200, "interval": 0.05}]))
    try:
        assert wait(lambda: adapter.health().extra["link"] == "up"), adapter.health()
        assert wait(lambda: adapter.health().state == "connected")
        assert adapter.reconnects >= 1
        assert adapter.health().extra["link_losses"] == 1
    finally:
        sender.terminate()
        sender.wait(10)


@pytest.mark.parametrize("mavlink2", [True, False])
def test_udpout_sends_gcs_heartbeats_when_asked(
    collector: CollectingContext, mavlink2: bool
) -> None:
    from pymavlink.dialects.v20 import ardupilotmega

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(10.0)
        port = peer.getsockname()[1]
        adapter = MavlinkAdapter(MavlinkOptions(
            connection=f"udpout:127.0.0.1:{port}", heartbeat_interval=0.1,
            source_system=250, mavlink2=mavlink2))
        adapter.start(collector)
        try:
            data, _addr = peer.recvfrom(1024)
        finally:
            adapter.stop(5.0)
    assert data[0] == (0xFD if mavlink2 else 0xFE)
    msg = ardupilotmega.MAVLink(None).parse_char(data)
    assert msg is not None and msg.get_type() == "HEARTBEAT"
    assert (msg.get_srcSystem(), msg.type, msg.autopilot) == (250, 6, 8)


def test_stop_while_silent_is_prompt_and_clean(start_adapter: Start) -> None:
    adapter, _port = start_adapter()
    adapter.stop(5.0)
    assert adapter.state == "stopped"
    assert adapter._thread is not None and not adapter._thread.is_alive()


def test_import_does_not_load_pymavlink() -> None:
    code = ("import sys, plexus.adapters.mavlink; "
            "assert 'pymavlink' not in sys.modules, 'pymavlink imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_pymavlink_names_the_extra(collector: CollectingContext) -> None:
    code = (
        "import sys; sys.modules['pymavlink'] = None\n"
        "from plexus.adapters.mavlink import MavlinkAdapter, MavlinkOptions\n"
        "from plexus.errors import AdapterError\n"
        "try:\n"
        "    MavlinkAdapter(MavlinkOptions(connection='udpin:127.0.0.1:0')).start(None)\n"
        "except AdapterError as exc:\n"
        "    assert 'plexus-gateway[mavlink]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
