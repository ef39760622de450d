"""Every adapter through the whole gateway, as a user runs it.

A rig file in tmp_path points ``gateway_url`` at the ``plexus_receiver``
fixture; ``python -m plexus.cli --config rig.yaml`` runs as a subprocess (or,
for python-can's in-process ``virtual`` bus, the same Gateway is built in this
process); the test drives the real peer (a CAN capture, mosquitto, a pymavlink
sender over UDP, a socat pty pair) and asserts on what the receiver stored.
Nothing here talks to an adapter object directly, except to wait until the
in-process CAN bus is open.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.mosquitto import MosquittoBroker
from tests.support import readings, require_binary, wait_until

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CAPTURE = DATA / "socialledge_candump.log"
DBC = DATA / "socialledge.dbc"
SENDER = REPO / "tests" / "adapters" / "mavlink_sender.py"
GATEWAY = [sys.executable, "-m", "plexus.cli"]

# The final log line of a run: "stopped after 3 s: a stopped (12 points, 0 errors, ...);
# ...; sink plexus (delivered 12, buffered 0, dropped 0, rejected 0)".
FINAL_STATUS = re.compile(r"stopped after \d+ s: (?P<adapters>.*?)(?P<sinks>(?:; )?sink .*)?$", re.M)
ADAPTER_STATUS = re.compile(r"(?:^|; )(?P<name>[^\s;]+) (?P<state>\w+) \((?P<points>\d+) points, "
                            r"(?P<errors>\d+) errors")


# --- helpers ---------------------------------------------------------------------------------


def write_rig(tmp_path: Path, receiver_url: str, adapters: str, extra: str = "") -> Path:
    """A rig file delivering to the test receiver; ``adapters`` is the indented list body."""
    path = tmp_path / "rig.yaml"
    path.write_text(
        "source_id: rig-01\n"
        "api_key: plx_test\n"
        f"gateway_url: {receiver_url}\n"
        "batch:\n  interval: 0.1\n"
        f"{extra}"
        f"adapters:\n{adapters}"
    )
    path.chmod(0o600)  # it holds a key: a world-readable one draws a warning
    return path


class GatewayProcess:
    """``plexus-gateway --config rig --no-status`` as a subprocess, its output read as it comes."""

    def __init__(self, rig: Path) -> None:
        # cwd is not the rig's folder, so relative paths in the rig must resolve against it.
        self.proc = subprocess.Popen(
            [*GATEWAY, "--config", str(rig), "--no-status"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Wait for a line containing ``text`` on stderr; fail if the gateway exits first."""
        ok = wait_until(lambda: text in self.stderr or self.proc.poll() is not None, timeout)
        assert ok and text in self.stderr, f"no {text!r} in the gateway's log:\n{self.stderr}"

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"the gateway exited early:\n{self.stderr}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for reader in self._readers:
                reader.join(10)
        return code

    def final_status(self) -> tuple[dict[str, tuple[str, int, int]], str]:
        """(name -> (state, points, errors), sinks text) from the last status line."""
        found = FINAL_STATUS.findall(self.stderr)
        assert found, f"no final status line:\n{self.stderr}"
        adapters_text, sinks = found[-1]
        adapters = {m["name"]: (m["state"], int(m["points"]), int(m["errors"]))
                    for m in ADAPTER_STATUS.finditer(adapters_text)}
        return adapters, sinks


@pytest.fixture
def start_gateway() -> Iterator[Callable[[Path], GatewayProcess]]:
    """Start gateway subprocesses; any still running at teardown is stopped."""
    started: list[GatewayProcess] = []

    def start(rig: Path) -> GatewayProcess:
        gateway = GatewayProcess(rig)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.proc.poll() is None:
            gateway.stop()


def of(points: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [p for p in points if p["metric"] == metric]


def with_prefix(points: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [p for p in points if p["metric"].startswith(prefix)]


# --- CAN: what cantools itself makes of the capture -------------------------------------------

CANDUMP_LINE = re.compile(r"^\((?P<ts>[\d.]+)\)\s+\S+\s+(?P<id>[0-9A-Fa-f]+)#(?P<data>[0-9A-Fa-f]*)")


def candump_frames(path: Path) -> list[tuple[int, bool, bytes]]:
    """(id, extended, payload) of each data frame of a candump -L log, read here by hand."""
    frames = []
    for line in path.read_text().splitlines():
        m = CANDUMP_LINE.match(line)
        assert m, f"not a candump data frame line: {line!r}"
        frames.append((int(m["id"], 16), len(m["id"]) > 3, bytes.fromhex(m["data"])))
    return frames


def expected_can_points(frames: list[tuple[int, bool, bytes]], dbc: Path, prefix: str = "can",
                        tags: dict[str, str] | None = None
                        ) -> tuple[list[tuple[str, Any, dict[str, str] | None]], int]:
    """The (metric, value, tags) the gateway should deliver, and the frames that cannot decode.

    Decoded with cantools directly: each signal is {prefix}.{Message}.{Signal}, a choice
    is sent as its name, a unit is a ``unit`` tag; an id the database does not define is
    {prefix}.raw.0x{ID} with the payload as hex; a frame of the wrong length is dropped.
    """
    cantools = pytest.importorskip("cantools")
    from cantools.database.namedsignalvalue import NamedSignalValue

    db = cantools.database.load_file(str(dbc), strict=False)
    out: list[tuple[str, Any, dict[str, str] | None]] = []
    undecodable = 0
    for frame_id, extended, data in frames:
        try:
            message = db.get_message_by_frame_id(frame_id)
        except KeyError:
            digits = 8 if extended else 3
            out.append((f"{prefix}.raw.0x{frame_id:0{digits}X}", data.hex().upper(), tags or None))
            continue
        try:
            decoded = message.decode(data, decode_choices=True, scaling=True, allow_excess=False)
        except Exception:
            undecodable += 1
            continue
        for name, value in decoded.items():
            unit = message.get_signal_by_name(name).unit
            point_tags = {**(tags or {}), **({"unit": unit} if unit else {})} or None
            if isinstance(value, NamedSignalValue):
                value = value.name
            out.append((f"{prefix}.{message.name}.{name}", value, point_tags))
    return out, undecodable


def stored(points: list[dict[str, Any]]) -> list[tuple[str, Any, dict[str, str] | None]]:
    return [(p["metric"], p["value"], p.get("tags")) for p in points]


def copy_can_files(tmp_path: Path) -> str:
    """Copy the capture and its DBC beside the rig; return the adapter entry using relative paths."""
    (tmp_path / "data").mkdir()
    shutil.copy(CAPTURE, tmp_path / "data" / CAPTURE.name)
    shutil.copy(DBC, tmp_path / "data" / DBC.name)
    return ("  - type: can\n"
            "    name: can-replay\n"
            f"    dbc: [data/{DBC.name}]\n"
            f"    replay: data/{CAPTURE.name}\n"
            "    replay_speed: 0\n")


def test_can_replay_delivers_every_decoded_signal(tmp_path, plexus_receiver, start_gateway):
    pytest.importorskip("can")
    expected, undecodable = expected_can_points(candump_frames(CAPTURE), DBC)
    # The capture is real: several SENSOR_SONARS frames, an enum, an unknown id, a bad frame.
    assert len(expected) > 10 and undecodable == 1
    assert any(m.startswith("can.raw.") for m, _v, _t in expected)

    rig = write_rig(tmp_path, plexus_receiver.url, copy_can_files(tmp_path))
    before_ms = int(time.time() * 1000)
    gateway = start_gateway(rig)
    assert plexus_receiver.wait_for(len(expected), timeout=20), gateway.stderr
    assert gateway.stop() == 0, gateway.stderr
    after_ms = int(time.time() * 1000)

    points = readings(plexus_receiver)
    assert stored(points) == expected  # the same values, in capture order, nothing more
    assert {p["source_id"] for p in points} == {"rig-01"}
    # replay_timestamps defaults to "now": stamped with this run's wall clock.
    assert all(before_ms <= p["timestamp"] <= after_ms for p in points)
    # Spot checks that the oracle itself read the capture as cantools' own test does.
    metrics = plexus_receiver.metrics()
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_enum"] == ["IO_DEBUG_test2_enum_two"]
    assert metrics["can.raw.0x1F3"] == ["010203"]

    adapters, sinks = gateway.final_status()
    state, count, errors = adapters["can-replay"]
    assert (count, errors) == (len(expected), undecodable)  # the capture's one bad frame
    assert f"delivered {len(expected)}, buffered 0, dropped 0, rejected 0" in sinks


def test_can_live_virtual_bus_in_process(tmp_path, plexus_receiver):
    can = pytest.importorskip("can")
    cantools = pytest.importorskip("cantools")
    from plexus.config import load_config_text
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins

    channel = f"plexus-e2e-{uuid.uuid4().hex}"
    text = (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
            "batch:\n  interval: 0.1\n"
            "tags:\n  vehicle: v1\n"
            "adapters:\n"
            "  - type: can\n"
            "    name: chassis\n"
            "    interface: virtual\n"
            f"    channel: {channel}\n"
            f"    dbc: [{DBC}]\n"
            "    tags:\n      bus: chassis\n")
    registry = load_plugins()
    config = load_config_text(text, str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    gateway = Gateway(config, registry)

    db = cantools.database.load_file(str(DBC), strict=False)
    status = db.get_message_by_name("MOTOR_STATUS")
    debug = db.get_message_by_name("IO_DEBUG")
    frames = [
        (status.frame_id, False, status.encode({"MOTOR_STATUS_wheel_error": 1,
                                                "MOTOR_STATUS_speed_kph": 12.5})),
        (debug.frame_id, False, debug.encode({"IO_DEBUG_test_unsigned": 200,
                                              "IO_DEBUG_test_enum": "IO_DEBUG_test2_enum_one",
                                              "IO_DEBUG_test_signed": -3,
                                              "IO_DEBUG_test_float": 1.5})),
        (0x7FF, False, bytes([0xDE, 0xAD])),  # no database defines it
        (status.frame_id, False, status.encode({"MOTOR_STATUS_wheel_error": 0,
                                                "MOTOR_STATUS_speed_kph": 30.25})),
    ]
    expected, undecodable = expected_can_points(frames, DBC, tags={"vehicle": "v1",
                                                                   "bus": "chassis"})
    assert undecodable == 0

    gateway.start()
    try:
        adapter = gateway.adapters[0][0]
        # The virtual bus delivers only to buses open at the time of sending.
        assert wait_until(lambda: adapter.state == "connected"), adapter.health()
        with can.Bus(interface="virtual", channel=channel) as bus:
            for frame_id, extended, data in frames:
                bus.send(can.Message(arbitration_id=frame_id, is_extended_id=extended,
                                     data=data))
        assert plexus_receiver.wait_for(len(expected), timeout=15)
    finally:
        gateway.shutdown(5.0)

    points = readings(plexus_receiver)
    assert stored(points) == expected
    metrics = plexus_receiver.metrics()
    assert metrics["can.MOTOR_STATUS.MOTOR_STATUS_speed_kph"] == [pytest.approx(12.5),
                                                                  pytest.approx(30.25)]
    (speed, *_rest) = of(points, "can.MOTOR_STATUS.MOTOR_STATUS_speed_kph")
    # Global tags, the adapter entry's tags and the signal's unit, all on one point.
    assert speed["tags"] == {"vehicle": "v1", "bus": "chassis", "unit": "kph"}
    (raw,) = of(points, "can.raw.0x7FF")
    assert raw["value"] == "DEAD" and raw["tags"] == {"vehicle": "v1", "bus": "chassis"}
    health = gateway.adapters[0][0].health()
    assert health.errors == 0 and health.points == len(expected)


# --- MQTT ------------------------------------------------------------------------------------

MQTT_MEASURED: list[tuple[str, str]] = [
    ("sensors/engine/rpm", "3450"),
    ("sensors/engine/coolant_temp", "88.5"),
    ("sensors/imu", json.dumps({"accel": {"x": 0.12, "y": -0.5, "z": 9.81}, "ok": True})),
    ("sensors/status", "running"),
]
MQTT_EXPECTED = {
    "sensors.engine.rpm": [3450],
    "sensors.engine.coolant_temp": [88.5],
    "sensors.imu.accel.x": [0.12],
    "sensors.imu.accel.y": [-0.5],
    "sensors.imu.accel.z": [9.81],
    "sensors.imu.ok": [True],
    "sensors.status": ["running"],
}


def mqtt_entry(port: int, name: str = "telemetry") -> str:
    return ("  - type: mqtt\n"
            f"    name: {name}\n"
            "    host: 127.0.0.1\n"
            f"    port: {port}\n"
            "    topics:\n      - {topic: 'sensors/#', qos: 1}\n"
            "    tags:\n      link: mqtt\n")


def mosquitto_pub(port: int, topic: str, payload: str) -> None:
    subprocess.run([require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port),
                    "-q", "1", "-t", topic, "-m", payload], check=True, timeout=15,
                   capture_output=True)


def mqtt_until_subscribed(port: int, receiver: Any, gateway: GatewayProcess) -> int:
    """Publish probes (QoS 1, not retained) until one reaches the receiver; return how many."""
    for attempt in range(1, 60):
        gateway.assert_running()
        mosquitto_pub(port, "sensors/probe", str(attempt))
        if wait_until(lambda: "sensors.probe" in receiver.metrics(), timeout=0.5):
            return attempt
    raise AssertionError(f"the gateway never got an MQTT message:\n{gateway.stderr}")


def publish_measured_mqtt(port: int, bad_payload: bool) -> None:
    for topic, payload in MQTT_MEASURED[:2]:
        mosquitto_pub(port, topic, payload)
    if bad_payload:
        mosquitto_pub(port, "sensors/broken", '{"accel": {"x": 1')  # JSON cut short
    for topic, payload in MQTT_MEASURED[2:]:
        mosquitto_pub(port, topic, payload)


def check_mqtt_points(points: list[dict[str, Any]]) -> None:
    measured = [p for p in with_prefix(points, "sensors.") if p["metric"] != "sensors.probe"]
    got: dict[str, list[Any]] = {}
    for p in measured:
        got.setdefault(p["metric"], []).append(p["value"])
    assert got == MQTT_EXPECTED  # the cut-short JSON delivered nothing
    assert all(p["tags"] == {"link": "mqtt"} for p in with_prefix(points, "sensors."))


def test_mqtt_messages_reach_the_receiver(tmp_path, plexus_receiver, start_gateway):
    pytest.importorskip("paho.mqtt.client")
    require_binary("mosquitto_pub")
    with MosquittoBroker(tmp_path / "broker") as broker:
        rig = write_rig(tmp_path, plexus_receiver.url, mqtt_entry(broker.port))
        gateway = start_gateway(rig)
        probes = mqtt_until_subscribed(broker.port, plexus_receiver, gateway)
        publish_measured_mqtt(broker.port, bad_payload=True)
        assert wait_until(lambda: "sensors.status" in plexus_receiver.metrics()), gateway.stderr
        assert gateway.stop() == 0, gateway.stderr

    points = readings(plexus_receiver)
    check_mqtt_points(points)
    # Every probe that was published after the subscription arrived, in order.
    probe_values = plexus_receiver.metrics()["sensors.probe"]
    assert probe_values == sorted(probe_values) and probe_values[-1] == probes
    adapters, _sinks = gateway.final_status()
    _state, count, errors = adapters["telemetry"]
    assert count == len(with_prefix(points, "sensors."))
    assert errors == 1  # the cut-short JSON


# --- MAVLink ---------------------------------------------------------------------------------

# An ArduCopter-like autopilot: MAV_TYPE_QUADROTOR, MAV_AUTOPILOT_ARDUPILOTMEGA,
# base_mode CUSTOM_MODE_ENABLED | STABILIZE_ENABLED | MANUAL_INPUT_ENABLED (81), +128 armed.
DISARMED: dict[str, Any] = {"msg": "HEARTBEAT", "fields": {
    "type": 2, "autopilot": 3, "base_mode": 81, "custom_mode": 0, "system_status": 3,
    "mavlink_version": 3}}
ARMED: dict[str, Any] = {"msg": "HEARTBEAT", "fields": {
    **DISARMED["fields"], "base_mode": 81 | 128, "system_status": 4}}


def attitude(roll: float) -> dict[str, Any]:
    return {"msg": "ATTITUDE", "fields": {"time_boot_ms": 1000, "roll": roll, "pitch": -0.25,
                                          "yaw": 1.5, "rollspeed": 0.0, "pitchspeed": 0.0,
                                          "yawspeed": 0.0}}


POSITION = {"msg": "GLOBAL_POSITION_INT", "fields": {
    "time_boot_ms": 2000, "lat": 473977420, "lon": 85455940, "alt": 488120,
    "relative_alt": 10500, "vx": 150, "vy": -250, "vz": 0, "hdg": 9000}}
FLIGHT = [ARMED, attitude(0.5), POSITION, DISARMED, attitude(-0.125)]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mavlink_entry(port: int, name: str = "fc") -> str:
    # link_timeout well above any pause between sender runs, so a slow machine
    # cannot turn this into a link-loss test (which counts an error).
    return ("  - type: mavlink\n"
            f"    name: {name}\n"
            f"    connection: udpin:127.0.0.1:{port}\n"
            "    auto_session: true\n"
            "    link_timeout: 60\n")


def mavlink_send(port: int, steps: list[dict[str, Any]]) -> None:
    subprocess.run([sys.executable, str(SENDER), "--port", str(port), "--steps",
                    json.dumps(steps)], check=True, timeout=60, cwd=REPO)


def mavlink_until_listening(port: int, receiver: Any, gateway: GatewayProcess) -> None:
    """Send disarmed HEARTBEATs until one reaches the receiver (UDP sent before bind is lost)."""
    for _ in range(30):
        gateway.assert_running()
        mavlink_send(port, [DISARMED])
        if wait_until(lambda: "heartbeat.armed" in receiver.metrics(), timeout=0.5):
            return
    raise AssertionError(f"the gateway never got a MAVLink packet:\n{gateway.stderr}")


def check_flight(points: list[dict[str, Any]]) -> None:
    """The FLIGHT steps' points: values, vehicle tags, and the session from arm to disarm."""
    fc = [p for p in points if (p.get("tags") or {}).get("system_id") == "1"]
    for p in fc:
        assert p["tags"]["component_id"] == "1", p
    rolls = of(fc, "attitude.roll")
    assert [p["value"] for p in rolls] == [pytest.approx(0.5), pytest.approx(-0.125)]
    (lat,) = of(fc, "global_position_int.lat")
    assert lat["value"] == pytest.approx(47.397742)  # degE7 -> deg
    (alt,) = of(fc, "global_position_int.alt")
    assert alt["value"] == pytest.approx(488.12)  # mm -> m
    assert [p["value"] for p in of(fc, "heartbeat.armed")][-3:] == [False, True, False]

    # The session: from the armed HEARTBEAT up to and including the disarmed one.
    armed_at = next(i for i, p in enumerate(fc) if p["metric"] == "heartbeat.armed" and p["value"])
    disarmed_at = max(i for i, p in enumerate(fc) if p["metric"] == "heartbeat.armed")
    first_of_armed_heartbeat = max(i for i, p in enumerate(fc[:armed_at])
                                   if p["metric"] == "heartbeat.armed") + 1
    in_flight = fc[first_of_armed_heartbeat:disarmed_at + 1]
    sessions = {p["tags"].get("session_id") for p in in_flight}
    assert len(sessions) == 1, sessions
    (session,) = sessions
    assert session is not None and re.fullmatch(r"flight-\d{8}-\d{6}-sys1", session), session
    assert {p["metric"] for p in in_flight} >= {"attitude.roll", "global_position_int.lat",
                                                "heartbeat.base_mode"}
    for p in in_flight:
        assert p["tags"]["vehicle_system_id"] == "1" and p["tags"]["vehicle_type"] == "2"
    outside = fc[:first_of_armed_heartbeat] + fc[disarmed_at + 1:]
    assert outside and all("session_id" not in p["tags"] for p in outside)
    assert rolls[0] in in_flight and rolls[1] in outside


def test_mavlink_fields_and_flight_session(tmp_path, plexus_receiver, start_gateway):
    pytest.importorskip("pymavlink")
    port = free_udp_port()
    rig = write_rig(tmp_path, plexus_receiver.url, mavlink_entry(port))
    gateway = start_gateway(rig)
    mavlink_until_listening(port, plexus_receiver, gateway)
    mavlink_send(port, FLIGHT)
    assert wait_until(lambda: len(plexus_receiver.metrics().get("attitude.roll", [])) >= 2), \
        gateway.stderr
    assert gateway.stop() == 0, gateway.stderr

    points = readings(plexus_receiver)
    check_flight(points)
    adapters, _sinks = gateway.final_status()
    _state, count, errors = adapters["fc"]
    assert (count, errors) == (len(points), 0)


# --- serial (NMEA over a socat pty pair) -----------------------------------------------------


def nmea(body: str) -> str:
    """A sentence with its checksum, computed here (XOR of the bytes between '$' and '*')."""
    checksum = functools.reduce(operator.xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}\r\n"


KNOT = 1852 / 3600  # m/s
# The NMEA standard's well-known example sentences, with their published checksums.
GGA_MUNICH = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC_MUNICH = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
# The Munich GGA with one digit of its altitude flipped and the old checksum kept: a
# corrupted line. (One changed character always changes an XOR checksum; "545.4" ->
# "999.9" would not, as 5^4^5 == 9^9^9.)
GGA_CORRUPTED = GGA_MUNICH.replace("545.4", "945.4")
GGA_SOUTH_WEST = nmea("GNGGA,064951.000,2307.1256,S,12016.4438,W,1,05,1.3,12.5,M,19.6,M,,")
NMEA_LINES = [GGA_MUNICH, RMC_MUNICH, GGA_CORRUPTED, GGA_SOUTH_WEST]
NMEA_EXPECTED: dict[str, list[float]] = {
    "gps.lat": [48 + 7.038 / 60, 48 + 7.038 / 60, -(23 + 7.1256 / 60)],
    "gps.lon": [11 + 31 / 60, 11 + 31 / 60, -(120 + 16.4438 / 60)],
    "gps.alt": [545.4, 12.5],
    "gps.speed": [22.4 * KNOT],
    "gps.course": [84.4],
    "gps.satellites": [8, 5],
    "gps.hdop": [0.9, 1.3],
    "gps.fix_quality": [1, 1],
}


class SocatPair:
    """Two linked ptys made by socat: ``device`` for the gateway, ``peer`` for the test."""

    def __init__(self, directory: Path) -> None:
        self.socat = require_binary("socat")
        self.device = directory / "ttyGPS"
        self.peer = directory / "ttyPEER"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None

    def __enter__(self) -> SocatPair:
        self.proc = subprocess.Popen(
            [self.socat, "-d", "-d", f"pty,raw,echo=0,link={self.device}",
             f"pty,raw,echo=0,link={self.peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: self.device.exists() and self.peer.exists()), "socat made no ptys"
        self.fd = os.open(self.peer, os.O_RDWR | os.O_NOCTTY)
        return self

    def write(self, text: str) -> None:
        assert self.fd is not None
        data = text.encode("ascii")
        while data:
            data = data[os.write(self.fd, data):]

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


def serial_entry(device: Path, name: str = "gps") -> str:
    return ("  - type: serial\n"
            f"    name: {name}\n"
            f"    port: {device}\n"
            "    baudrate: 9600\n"
            "    format: nmea\n")


def check_nmea_points(points: list[dict[str, Any]]) -> None:
    got: dict[str, list[Any]] = {}
    for p in with_prefix(points, "gps."):
        got.setdefault(p["metric"], []).append(p["value"])
    assert got == {metric: [pytest.approx(v, abs=1e-9) for v in values]
                   for metric, values in NMEA_EXPECTED.items()}
    assert 945.4 not in got["gps.alt"]  # the corrupted sentence delivered nothing
    assert all(type(v) is int for v in got["gps.satellites"])


def test_serial_nmea_reaches_the_receiver(tmp_path, plexus_receiver, start_gateway):
    pytest.importorskip("serial")
    with SocatPair(tmp_path) as pair:
        rig = write_rig(tmp_path, plexus_receiver.url, serial_entry(pair.device))
        gateway = start_gateway(rig)
        # pyserial empties the input queue when it opens the port: write only after that.
        gateway.wait_log(f"opened {pair.device}")
        for line in NMEA_LINES:
            pair.write(line)
        assert wait_until(lambda: len(plexus_receiver.metrics().get("gps.alt", [])) >= 2), \
            gateway.stderr
        assert gateway.stop() == 0, gateway.stderr

    points = readings(plexus_receiver)
    check_nmea_points(points)
    assert all("tags" not in p for p in points)  # no tags configured, none invented
    adapters, _sinks = gateway.final_status()
    _state, count, errors = adapters["gps"]
    assert (count, errors) == (len(points), 1)  # the corrupted sentence
    assert "checksum" in gateway.stderr  # and the log says why it was dropped


# --- all four at once ------------------------------------------------------------------------


def test_all_four_adapters_in_one_rig(tmp_path, plexus_receiver, start_gateway):
    for module in ("can", "cantools", "paho.mqtt.client", "pymavlink", "serial"):
        pytest.importorskip(module)
    require_binary("mosquitto_pub")
    expected_can, undecodable = expected_can_points(candump_frames(CAPTURE), DBC)
    udp_port = free_udp_port()

    with MosquittoBroker(tmp_path / "broker") as broker, SocatPair(tmp_path) as pair:
        rig = write_rig(tmp_path, plexus_receiver.url,
                        copy_can_files(tmp_path) + mqtt_entry(broker.port)
                        + mavlink_entry(udp_port) + serial_entry(pair.device))
        gateway = start_gateway(rig)
        # The replay runs at once, before anything else: its points carry no session.
        assert wait_until(lambda: len(with_prefix(plexus_receiver.points, "can."))
                          >= len(expected_can)), gateway.stderr
        gateway.wait_log(f"opened {pair.device}")
        for line in NMEA_LINES:
            pair.write(line)
        mqtt_until_subscribed(broker.port, plexus_receiver, gateway)
        publish_measured_mqtt(broker.port, bad_payload=False)
        # The flight last: its session tags every source's points while it is open.
        mavlink_until_listening(udp_port, plexus_receiver, gateway)
        mavlink_send(udp_port, FLIGHT)

        def all_arrived() -> bool:
            metrics = plexus_receiver.metrics()
            return (len(metrics.get("gps.alt", [])) >= 2 and "sensors.status" in metrics
                    and len(metrics.get("attitude.roll", [])) >= 2)

        assert wait_until(all_arrived), gateway.stderr
        assert gateway.stop() == 0, gateway.stderr

    points = readings(plexus_receiver)
    can_points = with_prefix(points, "can.")
    assert stored(can_points) == expected_can
    check_nmea_points(points)
    check_mqtt_points(points)
    check_flight(points)
    mavlink_points = [p for p in points if (p.get("tags") or {}).get("system_id") == "1"]
    assert len(can_points) + len(with_prefix(points, "gps.")) + len(with_prefix(
        points, "sensors.")) + len(mavlink_points) == len(points)

    adapters, sinks = gateway.final_status()
    assert set(adapters) == {"can-replay", "telemetry", "fc", "gps"}
    assert adapters["can-replay"][1:] == (len(can_points), undecodable)  # the capture's bad frame
    assert adapters["telemetry"][1:] == (len(with_prefix(points, "sensors.")), 0)
    assert adapters["fc"][1:] == (len(mavlink_points), 0)
    assert adapters["gps"][1:] == (len(with_prefix(points, "gps.")), 1)  # the corrupted sentence
    assert f"delivered {len(points)}, buffered 0, dropped 0, rejected 0" in sinks
