"""The gateway's built-in commands against real peers: python-can's virtual bus, a CAN
replay, and a pymavlink vehicle over UDP; plus the safety rules, the audit file,
--check and the status view."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.cli.status import link_line, summary
from plexus.config import load_config_text
from plexus.gateway import Gateway
from plexus.plugins import load_plugins
from tests.commands.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
VEHICLE = REPO / "tests" / "adapters" / "mavlink_vehicle.py"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Rig:
    """A gateway built in this process from rig YAML, delivering to ``rx``."""

    def __init__(self, rx: Any, tmp_path: Path, adapters: str, commands: str = "") -> None:
        self.rx = rx
        self.audit = tmp_path / "audit" / "rig.jsonl"
        registry = load_plugins()
        text = (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {rx.url}\n"
                "batch:\n  interval: 0.1\n"
                f"commands:\n  enabled: true\n  ws_url: {rx.ws_url}\n"
                f"  audit_file: {self.audit}\n{commands}"
                f"adapters:\n{adapters}")
        self.config = load_config_text(text, str(tmp_path / "rig.yaml"),
                                        adapter_types=registry.adapters,
                                        sink_types=registry.sinks)
        self.gateway = Gateway(self.config, registry)

    def __enter__(self) -> Rig:
        self.gateway.start()
        assert self.rx.device.wait_connected("rig-01", 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway.shutdown(2.0)

    def run(self, command: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self.rx.device.run(command, params, **kw)

    def adapter(self, name: str) -> Any:
        return next(a for a, _ in self.gateway.adapters if a.name == name)

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


class Bus:
    """A python-can virtual bus peer sending one frame every ``period`` seconds."""

    def __init__(self, channel: str, can_id: int = 100, period: float = 0.01) -> None:
        import can

        self.bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
        self.message = can.Message(arbitration_id=can_id, data=[1], is_extended_id=False)
        self.period = period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.bus.send(self.message)
            time.sleep(self.period)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.bus.shutdown()


@pytest.fixture
def channel() -> Iterator[str]:
    yield f"vcan-{uuid.uuid4().hex[:8]}"


def can_adapter(channel: str, extra: str = "") -> str:
    return (f"  - type: can\n    name: bus\n    interface: virtual\n    channel: {channel}\n"
            f"{extra}")


def count(rx: Any, metric: str) -> int:
    return len(rx.metrics().get(metric, []))


# --- CAN ------------------------------------------------------------------------------------

def test_start_and_stop_can_on_a_virtual_bus_with_a_new_dbc(rx, tmp_path, channel):
    with Rig(rx, tmp_path, can_adapter(channel)) as rig:
        bus = Bus(channel)
        try:
            assert wait_until(lambda: count(rx, "can.raw.0x064") > 5)
            bad = rig.run("start_can", {"channel": channel, "dbc_path": "missing.dbc"})
            assert bad.error_code == "bad_params" and "not found" in bad.error_message
            good = rig.run("start_can", {"channel": channel,
                                         "dbc_path": str(DATA / "socialledge.dbc")})
            assert good.state == "succeeded", good.statuses
            assert good.result["adapters"][0]["dbc"] == [str(DATA / "socialledge.dbc")]
            metric = "can.DRIVER_HEARTBEAT.DRIVER_HEARTBEAT_cmd"
            assert wait_until(lambda: count(rx, metric) > 5)

            stopped = rig.run("stop_can", {"channel": channel})
            assert stopped.result == {"adapters": [{"name": "bus", "state": "stopped"}]}
            rig.gateway.pipeline.flush(5)
            before = count(rx, metric)
            time.sleep(0.3)
            rig.gateway.pipeline.flush(5)
            assert count(rx, metric) == before  # nothing read while stopped

            again = rig.run("start_can", {"interval_ms": 200})  # every CAN adapter
            assert again.state == "succeeded"
            assert again.result["adapters"][0]["min_interval_s"] == 0.2
            assert wait_until(lambda: count(rx, metric) > before)
            assert wait_until(lambda: rig.adapter("bus").thinned > 10)
        finally:
            bus.close()
        unknown = rig.run("stop_can", {"channel": "can9"})
        assert unknown.error_code == "not_found" and "bus (channel" in unknown.error_message


def test_stop_and_start_a_can_replay(rx, tmp_path):
    adapters = (f"  - type: can\n    name: replay\n    replay: {DATA / 'socialledge_candump.log'}\n"
                f"    dbc: [{DATA / 'socialledge.dbc'}]\n    replay_speed: 1.0\n"
                "    replay_loop: true\n")
    with Rig(rx, tmp_path, adapters) as rig:
        adapter = rig.adapter("replay")
        assert wait_until(lambda: adapter.frames > 0)
        assert rig.run("stop_can", {"channel": "replay"}).state == "succeeded"
        assert adapter.state == "stopped"
        frames = adapter.frames
        time.sleep(0.2)
        assert adapter.frames == frames
        assert rig.run("start_can", {"channel": "replay"}).state == "succeeded"
        assert wait_until(lambda: adapter.frames > frames)


def test_configure_changes_options_or_keeps_the_old_ones(rx, tmp_path, channel):
    with Rig(rx, tmp_path, can_adapter(channel)) as rig:
        bus = Bus(channel)
        try:
            bad = rig.run("configure", {"sensor": "bus",
                                        "config": json.dumps({"prefix": 3, "raw": "hexx"})})
            assert bad.error_code == "bad_params"
            assert "config.prefix: expected a string, got 3" in bad.error_message
            assert "config.raw" in bad.error_message
            assert rig.adapter("bus").options.prefix == "can"
            secret = rig.run("configure", {"sensor": "bus",
                                           "config": json.dumps({"password": "hunter2"})})
            assert secret.error_code == "bad_params"
            missing = rig.run("configure", {"sensor": "nope", "config": "{}"})
            assert missing.error_code == "bad_params" and "bus" in missing.error_message
            good = rig.run("configure", {"sensor": "bus", "config": '{"prefix": "vehicle"}'})
            assert good.state == "succeeded" and good.result["changed"] == ["prefix"]
            assert wait_until(lambda: count(rx, "vehicle.raw.0x064") > 3)
            assert rig.adapter("bus").options.prefix == "vehicle"
        finally:
            bus.close()
        audit = rig.audit.read_text()
        assert "hunter2" not in audit and '\\"password\\":\\"***\\"' in audit


def test_a_stream_lifts_thinning_and_shortens_uploads_then_ends(rx, tmp_path, channel):
    extra = f"    min_interval: 5\n    dbc: [{DATA / 'socialledge.dbc'}]\n"
    metric = "can.DRIVER_HEARTBEAT.DRIVER_HEARTBEAT_cmd"
    with Rig(rx, tmp_path, can_adapter(channel, extra)) as rig:
        lane = rig.gateway.pipeline.lanes[0]
        bus = Bus(channel)
        try:
            assert wait_until(lambda: count(rx, metric) == 1)
            refused = rig.run("start_stream", {"metrics": "can.*", "store": False})
            assert refused.error_code == "bad_params"
            started = rig.run("start_stream", {"metrics": "can.DRIVER*, other.*",
                                               "interval_ms": 50, "duration_s": 1})
            assert started.state == "succeeded"
            assert started.result["metrics"] == ["can.DRIVER*", "other.*"]
            assert lane.uploader.interval == 0.05
            assert wait_until(lambda: count(rx, metric) > 20)
            assert wait_until(lambda: lane.uploader.interval == 0.1, 5)  # ended by itself
            sid = rig.run("start_stream", {"metrics": '["can.*"]', "interval_ms": 60}).result[
                "stream_id"]
            assert rig.run("stop_stream", {"stream_id": sid}).state == "succeeded"
            assert lane.uploader.interval == 0.1
            thinned = rig.adapter("bus").thinned
            assert wait_until(lambda: rig.adapter("bus").thinned > thinned + 5)
            assert rig.run("stop_stream", {"stream_id": sid}).error_code == "not_found"
        finally:
            bus.close()


# --- MAVLink --------------------------------------------------------------------------------

@pytest.fixture
def vehicle_port() -> Iterator[tuple[int, list[str]]]:
    port = free_udp_port()
    proc = subprocess.Popen([sys.executable, str(VEHICLE), "--port", str(port),
                             "--refuse", "183", "--silent", "181", "--in-progress", "241"],
                            stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    yield port, lines
    proc.kill()
    proc.wait(10)


def test_mavlink_command_against_a_vehicle(rx, tmp_path, vehicle_port):
    port, sent = vehicle_port
    adapters = (f"  - type: mavlink\n    name: fc\n    connection: udpin:127.0.0.1:{port}\n"
                "    messages: [HEARTBEAT, ATTITUDE]\n")
    commands = "  allow: ['*', mavlink_command]\n  mavlink_timeout: 0.5\n"
    with Rig(rx, tmp_path, adapters, commands) as rig:
        assert wait_until(lambda: rig.adapter("fc").vehicle is not None)
        armed = rig.run("mavlink_command", {"command": "arm"})
        assert armed.result == {"command": "MAV_CMD_COMPONENT_ARM_DISARM", "command_id": 400,
                                "result": "MAV_RESULT_ACCEPTED", "result_code": 0,
                                "target_system": 1}
        assert wait_until(lambda: True in rx.metrics().get("heartbeat.armed", []))
        mode = rig.run("mavlink_command", {"mode": "guided"})
        assert mode.state == "succeeded" and mode.result["command"] == "MAV_CMD_DO_SET_MODE"
        assert wait_until(lambda: 4 in rx.metrics().get("heartbeat.custom_mode", []))
        force = rig.run("mavlink_command", {"command": "disarm", "force": True})
        assert force.state == "succeeded"
        rtl = rig.run("mavlink_command", {"command": "NAV_RETURN_TO_LAUNCH"})
        assert rtl.result["command_id"] == 20
        refused = rig.run("mavlink_command", {"command": "MAV_CMD_DO_SET_SERVO",
                                              "param1": 9, "param2": "1500"})
        assert refused.error_code == "refused"
        assert refused.error_message == ("the vehicle answered MAV_CMD_DO_SET_SERVO with "
                                         "MAV_RESULT_DENIED (2)")
        silent = rig.run("mavlink_command", {"command": "DO_SET_RELAY"})
        assert silent.error_code == "timeout" and "no COMMAND_ACK" in silent.error_message
        slow = rig.run("mavlink_command", {"command": "PREFLIGHT_CALIBRATION"})
        assert slow.states == ["acknowledged", "running", "progress", "succeeded"]
        unknown_mode = rig.run("mavlink_command", {"mode": "WARP"})
        assert unknown_mode.error_code == "bad_params" and "GUIDED" in unknown_mode.error_message
        nothing = rig.run("mavlink_command", {})
        assert nothing.error_code == "bad_params"
        assert rig.run("stop_mavlink", {}).state == "succeeded"
        assert rig.run("mavlink_command", {"command": "arm"}).error_code == "not_connected"
        started = rig.run("start_mavlink", {"connection_string": f"udpin:127.0.0.1:{port}",
                                            "interval_ms": 500})
        assert started.result["adapters"][0]["min_interval_s"] == 0.5
        assert wait_until(lambda: rig.adapter("fc").thinned > 3)
    received = [json.loads(line) for line in sent]
    assert [r["command"] for r in received[:3]] == [400, 176, 400]
    assert received[0]["params"][:2] == [1.0, 0.0] and received[0]["target"] == [1, 1]
    assert received[1]["params"][:2] == [1.0, 4.0]  # custom mode enabled, GUIDED
    assert received[2]["params"][:2] == [0.0, 21196.0]  # forced disarm
    assert {"command": 183, "params": [9.0, 1500.0, 0, 0, 0, 0, 0], "target": [1, 1]} \
        in received


def test_mavlink_command_through_the_open_source_gateways_typed_command(
        plexus_receiver_factory, tmp_path, vehicle_port):
    port, _ = vehicle_port
    rx = plexus_receiver_factory(ws_generation="oss")
    adapters = f"  - type: mavlink\n    name: fc\n    connection: udpin:127.0.0.1:{port}\n"
    with Rig(rx, tmp_path, adapters, "  allow: [mavlink_command, start_can]\n") as rig:
        assert wait_until(lambda: rig.adapter("fc").vehicle is not None)
        # The open-source gateway copies source_id into params.
        result = rx.device.call("mavlink_command", {"source_id": "rig-01", "command": "arm",
                                                    "force": "true"})
        assert result.events == ["ack", "result"]
        assert result.result["result"] == "MAV_RESULT_ACCEPTED"
        bad = rx.device.call("mavlink_command", {"command": "arm", "speed": 3})
        assert bad.error == "bad_params: unknown parameter(s): speed"
        denied = rx.device.call("stop_can", {})
        assert denied.error == "command 'stop_can' is not in the rig's commands.allow"


def test_vehicle_commands_are_refused_unless_named(rx, tmp_path, channel):
    with Rig(rx, tmp_path, can_adapter(channel), "  allow: ['*']\n  deny: [stop_*]\n") as rig:
        announced = {c["name"] for c in rx.device.auths[-1]["commands"]}
        assert announced == {"configure", "start_can", "start_mavlink", "start_stream"}
        result = rig.run("mavlink_command", {"command": "arm"})
        assert result.error_code == "not_allowed"
        assert "can move a vehicle" in result.error_message
        assert rig.run("stop_can").error_code == "not_allowed"
        assert rig.gateway.commands.center.refusals["stop_can"].endswith("(commands.deny)")
        records = rig.audit_records()
    assert [(r["command"], r["outcome"], r["error_code"]) for r in records] == [
        ("mavlink_command", "failed", "not_allowed"), ("stop_can", "failed", "not_allowed")]
    assert stat.S_IMODE(os.stat(rig.audit).st_mode) == 0o600
    assert set(records[0]) == {"time", "run_id", "command", "params", "via", "attempt",
                               "outcome", "error_code", "message", "duration_s"}


def test_status_view_shows_the_link_and_the_last_command(rx, tmp_path, channel):
    with Rig(rx, tmp_path, can_adapter(channel)) as rig:
        assert rig.run("stop_can").state == "succeeded"
        status = rig.gateway.status()
        assert status["link"]["state"] == "up"
        assert status["link"]["last_command"]["command"] == "stop_can"
        text = link_line(status["link"])
        assert text.startswith("link up") and "last command stop_can succeeded" in text
        assert text in summary(status)  # the status line off a terminal; the table shows it too
    assert rig.gateway.status()["link"]["state"] == "stopped"


def test_check_validates_the_commands_section(tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text("source_id: rig-01\ncommands:\n  enabled: true\n"
                   "  allow: [start_can, mavlink_comand]\n  ws_url: http://nope\n"
                   "  stream_max_seconds: 0\n")
    result = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78  # ExitCode.CONFIG
    assert "commands.ws_url: must start with ws:// or wss://" in result.stderr
    assert "commands.stream_max_seconds: must be greater than 0" in result.stderr
    rig.write_text("source_id: rig-01\ncommands:\n  enabled: true\n"
                   "  allow: [start_can, mavlink_comand]\n")
    result = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "commands.allow: 'mavlink_comand' matches no command" in result.stderr
    rig.write_text("source_id: rig-01\napi_key: plx_k\ncommands:\n  enabled: true\n"
                   "  allow: [start_can]\n")
    result = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "allowed: start_can" in result.stdout
    assert "refused: mavlink_command: command 'mavlink_command' can move a vehicle" \
        in result.stdout
