"""The official SDK's README (plexus-python 0.16), example by example, against the local receiver.

An SDK user who installs this package keeps their code. So every example of
that README that does not need the hosted platform's video or test-run APIs
runs here as such a user wrote it (in our own words: the names and values
differ, the calls and what they must do do not), in the environment the
README sets up: ``PLEXUS_API_KEY``, and ``PLEXUS_GATEWAY_URL`` /
``PLEXUS_GATEWAY_WS_URL`` pointing at the local receiver instead of the
platform. Complete scripts run as scripts, in their own process; snippets
that need a ``px`` run in the test. Around each example is only what it
takes for granted (a sensor, a bus, a broker) and the checks of what arrived.
The hosted-only examples are checked to fail at the call, loudly.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from plexus import Plexus, UnsupportedError

KEY = "plx_test"
SENDER = Path(__file__).parent / "adapters" / "mavlink_sender.py"


@pytest.fixture
def receiver(plexus_receiver, monkeypatch):
    """The local receiver, and the environment the README tells SDK users to set."""
    monkeypatch.setenv("PLEXUS_API_KEY", KEY)
    monkeypatch.setenv("PLEXUS_GATEWAY_URL", plexus_receiver.url)
    monkeypatch.setenv("PLEXUS_GATEWAY_WS_URL", plexus_receiver.ws_url)
    return plexus_receiver


def script(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(script(code), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return done


def by_metric(receiver) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for point in receiver.points:
        out.setdefault(point["metric"], []).append(point)
    return out


# --- Get started / Device identity ---------------------------------------------------------


def test_get_started_script_delivers_without_calling_close(receiver):
    # The README's first script ends after send(): what it sent must still arrive.
    run_script("""
        from plexus import Plexus

        px = Plexus(source_id="bench-007")   # the key comes from PLEXUS_API_KEY
        px.send("temperature", 72.5)
    """)
    assert [(p["source_id"], p["metric"], p["value"]) for p in receiver.points] == [
        ("bench-007", "temperature", 72.5)]


def test_without_a_source_id_one_is_made_up_saved_and_kept(receiver, isolated_home):
    code = """
        from plexus import Plexus

        px = Plexus()
        px.send("uptime.s", 12)
    """
    run_script(code)
    run_script(code)
    config = isolated_home / ".plexus" / "config.json"
    saved = json.loads(config.read_text())["source_id"]
    assert saved.startswith("source-") and len(saved) == len("source-") + 8
    assert config.stat().st_mode & 0o077 == 0
    assert [p["source_id"] for p in receiver.points] == [saved, saved]


def test_the_key_is_read_from_the_config_file_when_the_environment_has_none(
        receiver, isolated_home, monkeypatch):
    monkeypatch.delenv("PLEXUS_API_KEY")
    config = isolated_home / ".plexus" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"api_key": KEY}))
    config.chmod(0o600)
    run_script("""
        from plexus import Plexus

        Plexus(source_id="old-setup").send("boot.count", 3)
    """)
    assert receiver.points[0]["source_id"] == "old-setup"


# --- Core methods ---------------------------------------------------------------------------


def test_send_every_kind_of_value_with_tags_and_timestamps(receiver):
    taken_at = time.time() - 30
    px = Plexus(source_id="rig-01")   # reads PLEXUS_API_KEY from env

    px.send("engine.rpm", 3450)
    px.send("coolant.temp", 82.3)
    px.send("fuel.level", 0.75)
    px.send("controller.state", "RUNNING")
    px.send("fault.code", "E_STALL")
    px.send("pump.enabled", True)
    px.send("imu.accel", {"x": 1.5, "y": 2.3})
    px.send("arm.joints", [0.5, 1.2, -0.3])
    px.send("motor.rpm", 1200, tags={"motor_id": "A1"})
    px.send("motor.rpm", 1210, timestamp=taken_at)

    px.close()
    got = by_metric(receiver)
    assert got["engine.rpm"][0]["value"] == 3450 and got["coolant.temp"][0]["value"] == 82.3
    assert got["controller.state"][0]["value"] == "RUNNING"
    assert got["pump.enabled"][0]["value"] is True
    assert got["imu.accel"][0]["value"] == {"x": 1.5, "y": 2.3}
    assert got["arm.joints"][0]["value"] == [0.5, 1.2, -0.3]
    assert got["motor.rpm"][0]["tags"] == {"motor_id": "A1"}
    assert got["motor.rpm"][1]["timestamp"] == int(taken_at * 1000)
    assert {p["source_id"] for p in receiver.points} == {"rig-01"}


def test_send_batch_shares_a_timestamp_unless_a_reading_brings_its_own(receiver):
    px = Plexus(source_id="rig-01")
    t = 1_700_000_000.0
    t_imu, t_baro = t + 0.25, t + 0.5

    px.send_batch([
        ("air.temperature", 22.4),
        ("air.humidity",    58.1),
        ("air.pressure",    1013.2),
    ])
    px.send_batch([
        ("imu.accel_x", 0.12, t_imu),
        ("baro.alt",    1013.2, t_baro),
        ("board.temp",  22.4),
    ], timestamp=t)

    px.close()
    got = {p["metric"]: p["timestamp"] for p in receiver.points}
    assert got["air.temperature"] == got["air.humidity"] == got["air.pressure"]
    assert abs(got["air.temperature"] - time.time() * 1000) < 60_000
    assert (got["imu.accel_x"], got["baro.alt"], got["board.temp"]) == (
        1_700_000_000_250, 1_700_000_000_500, 1_700_000_000_000)
    assert len(receiver.requests) <= 2


class Gyro:
    """A stand-in for the sensors the batch() example reads."""

    def __init__(self) -> None:
        self.n = 0

    @property
    def x(self) -> float:
        self.n += 1
        return self.n / 100


def test_batch_coalesces_a_fast_stream_and_strands_nothing(receiver):
    px = Plexus(source_id="rig-01")
    att, gyro = Gyro(), Gyro()
    grabber = type("Grabber", (), {"count": 0})()
    loops = itertools.count()
    running = True

    with px.batch(interval_ms=50) as b:
        while running:
            b.send("att.pos_x", att.x)
            b.send("att.rate_x", gyro.x)
            b.send("frames.captured", grabber.count)
            grabber.count += 1
            running = next(loops) < 999
            if grabber.count % 250 == 0:
                time.sleep(0.01)

    px.close()
    got = by_metric(receiver)
    assert [p["value"] for p in got["frames.captured"]] == list(range(1000))
    assert [p["value"] for p in got["att.pos_x"]] == [n / 100 for n in range(1, 1001)]
    stamps = [p["timestamp"] for p in got["att.rate_x"]]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 30  # taken, not flushed, at
    assert len(receiver.requests) < 30  # 3,000 readings, a handful of requests


def test_events_and_log_lines(receiver):
    px = Plexus(source_id="rig-01")

    px.event("fault",        "E-stop triggered")
    px.event("state_change", {"from": "IDLE", "to": "RUNNING"})
    px.event("sensor_error", {"sensor": "imu", "code": 42}, tags={"motor": "A"})
    px.event("log", {"level": "error", "msg": "IMU read timed out"})

    px.close()
    got = by_metric(receiver)
    assert got["fault"][0]["value"] == "E-stop triggered"
    assert got["state_change"][0]["value"] == {"from": "IDLE", "to": "RUNNING"}
    assert got["sensor_error"][0]["tags"] == {"motor": "A"}
    assert got["log"][0]["value"] == {"level": "error", "msg": "IMU read timed out"}


# --- Bring your own protocol ---------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mavlink_loop(receiver):
    pytest.importorskip("pymavlink")
    from pymavlink import mavutil

    px = Plexus(source_id="drone-001")
    port = free_udp_port()
    link = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}")
    rolls = [0.1, 0.2, 0.3]
    steps = [{"msg": "HEARTBEAT", "fields": {"type": 2, "autopilot": 3}}] + [
        {"msg": "ATTITUDE", "fields": {"roll": r, "pitch": 0.0, "yaw": 1.0}} for r in rolls]
    sender = subprocess.Popen([sys.executable, str(SENDER), "--port", str(port),
                               "--steps", json.dumps(steps)])
    try:
        # The README's `conn`: the messages arriving on the link, until it goes quiet.
        conn = iter(lambda: link.recv_match(blocking=True, timeout=5), None)

        for msg in conn:
            if msg.get_type() == "ATTITUDE":
                px.send("attitude.roll", msg.roll)

    finally:
        sender.wait(30)
        link.close()
    px.close()
    assert [p["value"] for p in receiver.points] == pytest.approx(rolls)


def test_can_loop(receiver):
    can = pytest.importorskip("can")
    px = Plexus(source_id="car-01")
    channel = f"sdk-readme-{os.getpid()}"
    bus = can.Bus(interface="virtual", channel=channel)
    peer = can.Bus(interface="virtual", channel=channel)
    try:
        peer.send(can.Message(arbitration_id=0x123, data=[0x01, 0x02], is_extended_id=False))
        peer.send(can.Message(arbitration_id=0x7DF, data=[0xFF], is_extended_id=False))
        frames = itertools.islice(bus, 2)  # the README loops forever; a test stops

        for msg in frames:
            px.send(f"can.0x{msg.arbitration_id:x}", int.from_bytes(msg.data, "big"))

    finally:
        bus.shutdown()
        peer.shutdown()
    px.close()
    assert [(p["metric"], p["value"]) for p in receiver.points] == [("can.0x123", 0x0102),
                                                                    ("can.0x7df", 0xFF)]


def test_mqtt_callback(receiver, tmp_path):
    pytest.importorskip("paho.mqtt")
    import paho.mqtt.client as mqtt

    from tests.adapters.mosquitto import MosquittoBroker

    px = Plexus(source_id="greenhouse")

    def on_message(_c, _u, msg):
        px.send(msg.topic.replace("/", "."), float(msg.payload))

    with MosquittoBroker(tmp_path / "broker") as broker:
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        listener.on_message = on_message
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("sensors/#", qos=1)
        listener.loop_start()
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        try:
            deadline = time.monotonic() + 15
            while not receiver.count and time.monotonic() < deadline:
                publisher.publish("sensors/soil/moisture", "41.5", qos=1).wait_for_publish(5)
                px.flush_buffer(timeout=5)
        finally:
            for client in (publisher, listener):
                client.disconnect()
                client.loop_stop()
    px.close()
    assert receiver.points[0]["metric"] == "sensors.soil.moisture"
    assert receiver.points[0]["value"] == 41.5


def test_i2c_sensor_reading(receiver):
    bme = type("BME280", (), {"temperature": 23.75})()  # an Adafruit driver's object
    px = Plexus(source_id="weather-01")

    px.send("temperature", bme.temperature)

    px.close()
    assert receiver.points[0]["value"] == 23.75


# --- Reliability, timestamps, transport -------------------------------------------------------


def test_memory_buffer_counts_and_flushes_what_could_not_be_sent(receiver):
    receiver.go_down()
    px = Plexus(persistent_buffer=False)
    for i in range(5):
        px.send("pump.pressure", 1.0 + i)

    assert px.buffer_size() == 5
    receiver.come_up()
    assert px.flush_buffer() is True
    assert px.buffer_size() == 0

    px.close()
    assert [p["value"] for p in receiver.points] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_max_buffer_size_caps_the_buffer_dropping_the_oldest(receiver):
    receiver.go_down()
    px = Plexus(source_id="rig-01", max_buffer_size=3, close_timeout=0.2)
    for i in range(10):
        px.send("seq", i)
    assert px.buffer_size() == 3
    receiver.come_up()
    px.flush_buffer()
    px.close()
    assert [p["value"] for p in receiver.points] == [7, 8, 9]  # the newest kept


def test_timestamps_picked_or_given(receiver):
    px = Plexus(source_id="rig-01")
    t = 1_700_000_123.456
    before = time.time()

    px.send("temperature", 72.5)                # the time is picked here
    px.send("temperature", 72.5, timestamp=t)   # the given time, used as it is

    px.close()
    picked, given = (p["timestamp"] for p in receiver.points)
    assert before * 1000 - 1 <= picked <= time.time() * 1000 + 1
    assert given == 1_700_000_123_456


def test_the_one_transport_mode(receiver):
    px = Plexus()
    px.send("link.ok", True)
    px.close()
    assert receiver.points[0]["value"] is True


# --- Commands -------------------------------------------------------------------------------


COMMANDS_SCRIPT = """
    import sys

    from plexus import Plexus


    class Pdu:  # stands in for the power distribution unit the README drives
        def outlet(self, n):
            return self

        def off(self):
            print("outlet switched off", flush=True)


    pdu = Pdu()
    px = Plexus(source_id="pod-07")

    @px.command("power_off", title="Power off", danger="critical", idempotent=True,
                expires_in=30,
                params={"outlet": {"type": "integer", "minimum": 1, "maximum": 8}})
    def power_off(run, outlet):
        pdu.outlet(outlet).off()                 # your code
        return {"outlet": outlet, "state": "off"}

    px.on_command("reboot", lambda command, params: {"rebooting": params.get("delay", 0)})

    px.serve()   # blocks until Ctrl+C / SIGTERM
    print("served", flush=True)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_commands_script_answers_until_ctrl_c_or_sigterm(receiver, plexus_run_command, stop):
    proc = subprocess.Popen(script(COMMANDS_SCRIPT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        ran = plexus_run_command("power_off", {"outlet": "3"}, source_id="pod-07", timeout=30)
        assert ran.state == "succeeded" and ran.result == {"outlet": 3, "state": "off"}
        refused = plexus_run_command("power_off", {"outlet": 9}, source_id="pod-07")
        assert refused.state == "failed" and refused.error_code == "bad_params"
        legacy = plexus_run_command("reboot", {"delay": 5}, source_id="pod-07", legacy=True)
        assert legacy.result == {"rebooting": 5}
        declared = receiver.device.auths[-1]["commands"]
        assert [c["name"] for c in declared] == ["power_off"]  # legacy ones are not announced
        assert declared[0]["danger"] == "critical" and declared[0]["title"] == "Power off"
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["outlet switched off", "served"]  # the bad run never ran


# --- What needs the hosted platform ---------------------------------------------------------


def test_runs_and_video_fail_at_the_call(receiver):
    px = Plexus(source_id="rig-01")
    bench = type("Bench", (), {"execute": lambda self: px.send("motor.temp_c", 70.0)})()

    with pytest.raises(UnsupportedError, match="px.session"):
        with px.run("hotfire-03", pass_criteria=[
            {"metric": "motor.temp_c", "operator": "<", "value": 85},
        ]) as run:  # noqa: F841
            bench.execute()
    with pytest.raises(UnsupportedError, match="video"):
        px.send_video_frame(b"\xff\xd8\xff\xd9", camera_id="front")
    with pytest.raises(UnsupportedError, match="video"):
        px.stream_camera("rtsp://127.0.0.1/stream", camera_id="front")

    px.send("after", 1.0)
    px.close()
    assert [p["metric"] for p in receiver.points] == ["after"]  # the run's body never ran
