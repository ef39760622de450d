"""The device-link conformance checklist, item by item, against the local receiver.

Each test names its checklist item (the numbering of the protocol's client
checklist; docs/commands.md lists them with how each is met). Items 7, 8,
9, 12 and 13 are about telemetry frames, which this client never sends: the
tests for them check that telemetry goes over HTTP /ingest whatever the
link does.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest

from plexus import Cancelled, ConfigError, Plexus
from plexus.commands import CommandCenter, declare
from plexus.link import (
    DEFAULT_WS_URL,
    DeviceLink,
    check_link_source_id,
    device_url,
    goodbye_delay,
    reconnect_delay,
)
from plexus.secret import Secret
from tests.commands.conftest import Gate, wait_until


def echo(run, **params):
    return params


def linked(px: Plexus, rx) -> None:
    assert rx.device.wait_connected(px.source_id, 10), f"link state {px.link_state}"
    assert wait_until(lambda: px.link_state == "up")


# 1 ----------------------------------------------------------------------------------------
def test_01_url_appends_ws_device_only_when_missing():
    assert device_url("wss://gateway.plexus.company") == "wss://gateway.plexus.company/ws/device"
    assert device_url("ws://h:1/") == "ws://h:1/ws/device"
    assert device_url("ws://h:1/ws/device") == "ws://h:1/ws/device"
    assert device_url("ws://h:1/ws/device/") == "ws://h:1/ws/device"
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        device_url("https://gateway.plexus.company")


def test_01_ws_url_is_read_independently_of_the_gateway_url(rx, monkeypatch):
    monkeypatch.setenv("PLEXUS_GATEWAY_URL", rx.url)
    px = Plexus(api_key="plx_test", source_id="pod-07")
    assert px.ws_url is None  # not derived from PLEXUS_GATEWAY_URL: the default applies
    px.close()
    monkeypatch.setenv("PLEXUS_GATEWAY_WS_URL", rx.ws_url + "/")
    monkeypatch.setenv("PLEXUS_GATEWAY_URL", "http://127.0.0.1:9")  # nothing listens there
    px = Plexus(api_key="plx_test", source_id="pod-07")
    px.on_command("noop", lambda c, p: None)
    try:
        linked(px, rx)
        assert px._link.url == rx.ws_url + "/ws/device"
    finally:
        px.close(timeout=0)
    assert DEFAULT_WS_URL == "wss://gateway.plexus.company"


# 2 ----------------------------------------------------------------------------------------
def test_02_device_auth_is_the_first_frame_with_every_field(rx, make_client):
    px = make_client(rx)
    px.command("reboot", danger="critical")(echo)
    linked(px, rx)
    auth = rx.device.auths[0]
    assert {k: auth[k] for k in auth if k != "commands"} == {
        "type": "device_auth", "api_key": "plx_test", "source_id": "pod-07",
        "platform": "python-sdk", "agent_version": "0.1.0", "protocol": 1,
        "hears_goodbye": True, "acks": True}
    assert auth["commands"] == [{"name": "reboot", "params": {}, "danger": "critical",
                                 "idempotent": False, "expires_in_s": 30.0,
                                 "concurrency": "accept"}]
    assert rx.device.frames == []  # nothing was sent after the auth (no command, no heartbeat)


def test_02_commands_are_left_out_when_none_is_declared(rx, make_client):
    px = make_client(rx)
    px.on_command("legacy_only", lambda c, p: None)  # legacy handlers are not announced
    linked(px, rx)
    assert "commands" not in rx.device.auths[0]


def test_02_a_client_that_only_sends_opens_no_socket(rx, make_client):
    px = make_client(rx)
    px.send("temperature", 21.5)
    px.flush_buffer(5)
    assert rx.count == 1
    assert px.link_state == "off" and rx.device.connections == 0


# 3 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_id", ["Pod-07", "-pod", "a" * 257,
                                       "123e4567-e89b-12d3-a456-426614174000",
                                       "123e4567e89b12d3a456426614174000"])
def test_03_refuses_bad_source_ids_before_connecting(rx, source_id):
    with pytest.raises(ConfigError):
        check_link_source_id(source_id)


def test_03_uuid_source_id_raises_at_declaration_and_never_connects(rx):
    px = Plexus(api_key="plx_test", source_id="123e4567-e89b-12d3-a456-426614174000",
                gateway_url=rx.url, ws_url=rx.ws_url)
    try:
        with pytest.raises(ConfigError, match="looks like a UUID"):
            px.command("reboot")(echo)
        time.sleep(0.2)
        assert rx.device.connections == 0
    finally:
        px.close(timeout=0)


# 4 and 5 ----------------------------------------------------------------------------------
class RecordingWait:
    """A reconnect wait that returns at once and remembers the delays asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        time.sleep(0.01)
        return False


def make_link(rx, center=None, **kwargs) -> DeviceLink:
    center = center or CommandCenter()
    return DeviceLink(rx.ws_url, Secret(rx.api_key), "pod-07", center, **kwargs)


def test_04_error_frame_close_1008_and_silence_are_auth_failures(rx, caplog):
    rx.device.refuse_auth_next(1)
    rx.device.ignore_auth_next(1)
    wait = RecordingWait()
    link = make_link(rx, wait=wait, auth_timeout=0.3)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link.start()
    try:
        assert link.wait_up(10)
        assert rx.device.connections == 3
        assert len(wait.delays) == 2  # two failures, each followed by backoff (not goodbye)
        text = caplog.text
        assert "Invalid API key" in text
        assert "no answer to device_auth within 0.3 s" in text
        assert rx.api_key not in text
    finally:
        link.stop()


def test_04_a_wrong_key_keeps_retrying_with_backoff_and_never_logs_the_key(
        plexus_receiver_factory, caplog):
    rx = plexus_receiver_factory(api_keys=["plx_good"])
    wait = RecordingWait()
    link = DeviceLink(rx.ws_url, Secret("plx_secret_wrong"), "pod-07", CommandCenter(),
                      wait=wait)
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link.start()
    try:
        assert wait_until(lambda: len(wait.delays) >= 4)
    finally:
        link.stop()
    assert not link.up
    assert "plx_secret_wrong" not in caplog.text and "plx_secret_wrong" not in repr(link)
    # One warning for the repeated refusal, not one per attempt.
    assert caplog.text.count("WARNING") == 1


def test_04_stopping_during_authentication_is_not_a_refusal(rx, caplog):
    rx.device.ignore_auth_next(1)
    link = make_link(rx, auth_timeout=30)
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link.start()
    try:
        assert wait_until(lambda: link.connections == 1)
        time.sleep(0.2)  # device_auth sent and unanswered: the link waits for the reply
    finally:
        link.stop()
    # Our own close ended the wait: nothing was refused, nothing failed.
    assert "refused" not in caplog.text and "failed" not in caplog.text
    assert link.last_error is None and link.state == "stopped"


def test_05_backoff_is_min_2_to_the_n_and_60_with_25_percent_jitter():
    rng = random.Random(7)
    for n in range(12):
        nominal = min(2 ** n, 60)
        for _ in range(200):
            delay = reconnect_delay(n, rng)
            assert max(0.1, nominal * 0.75) <= delay <= nominal * 1.25
    for _ in range(200):
        assert 0.1 <= goodbye_delay(rng) <= 0.5


def test_05_n_grows_with_each_failure_and_resets_after_auth(rx):
    rx.device.refuse_auth_next(3)
    wait = RecordingWait()
    link = make_link(rx, wait=wait)
    link.start()
    try:
        assert link.wait_up(10)
        rx.device.drop()  # no close frame: a failure, not a goodbye
        assert rx.device.wait_connected(connections=5, timeout=10)
        assert link.wait_up(10)
    finally:
        link.stop()
    first, second, third, after_auth = wait.delays[:4]
    assert 0.75 <= first <= 1.25 and 1.5 <= second <= 2.5 and 3.0 <= third <= 5.0
    assert 0.75 <= after_auth <= 1.25  # n started again from 0


# 6 ----------------------------------------------------------------------------------------
def test_06_clock_offset_from_server_time_and_a_warning_when_large(rx, make_client, caplog):
    rx.device.clock_skew_ms = 7_500  # the platform's clock is 7.5 s ahead of ours
    caplog.set_level(logging.WARNING, logger="plexus.link")
    px = make_client(rx)
    assert px.clock_offset is None
    px.command("noop")(echo)
    linked(px, rx)
    assert 7.3 < px.clock_offset < 7.6
    # The client's clock takes server_time_ms as a time reference and says what it does
    # about the difference (docs/time.md), from its own thread.
    deadline = time.monotonic() + 5
    while "the system clock is 7.5 s behind the platform's time (device link)" not in \
            caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "the system clock is 7.5 s behind the platform's time (device link)" in caplog.text


def test_06_no_warning_for_a_clock_in_step(rx, make_client, caplog):
    caplog.set_level(logging.WARNING, logger="plexus.link")
    px = make_client(rx)
    px.command("noop")(echo)
    linked(px, rx)
    assert abs(px.clock_offset) < 0.5
    assert "clock" not in caplog.text


# 7, 8, 9, 12, 13: telemetry stays on HTTP -------------------------------------------------
def test_07_to_13_telemetry_goes_over_http_never_over_the_link(rx, make_client):
    px = make_client(rx)
    px.command("noop")(echo)
    linked(px, rx)
    px.send_batch([(f"m{i}", i) for i in range(20)])
    px.flush_buffer(5)
    rx.device.drop()  # link down: nothing changes for telemetry
    px.send("while_down", 1.0)
    px.flush_buffer(5)
    assert rx.count == 21
    assert {r.path for r in rx.requests} == {"/ingest"}
    assert all(f.type != "telemetry" for f in rx.device.frames)


# 10 ---------------------------------------------------------------------------------------
def test_10_heartbeats_and_pongs(rx):
    link = make_link(rx, heartbeat_interval=0.1)
    link.start()
    try:
        assert link.wait_up(10)
        beats = rx.device.wait_frame(lambda f: f.type == "heartbeat", count=3, timeout=5)
        assert len(beats) >= 3
        assert beats[0].frame["source_id"] == "pod-07"
        assert beats[0].frame["agent_version"] == "0.1.0"
        assert rx.device.ping(b"payload-42")  # the pong carried the same payload back
    finally:
        link.stop()


# 11 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [1000, 1001, 1008, 1013])
def test_11_a_server_close_frame_is_a_goodbye_reconnect_in_point_1_to_point_5_s(rx, code):
    wait = RecordingWait()
    link = make_link(rx, wait=wait)
    link.start()
    try:
        assert link.wait_up(10)
        rx.device.close(code, "bye")
        assert rx.device.wait_connected(connections=2, timeout=5)
        assert link.wait_up(5)
    finally:
        link.stop()
    assert len(wait.delays) == 1 and 0.1 <= wait.delays[0] <= 0.5
    assert link.last_error is None or "close" in link.last_error


def test_11_no_status_is_written_after_the_goodbye(rx):
    center = CommandCenter()
    gate = Gate()
    center.add(declare("slow", gate))
    rx.device.auto_ack = False
    link = make_link(rx, center)
    link.start()
    try:
        assert link.wait_up(10)
        rid = rx.device.send_run("slow")
        assert gate.entered.wait(5)
        rx.device.close(1001, "going away")
        assert wait_until(lambda: not link.up, 5)
        gate.release.set()
        # The final status is kept and replayed on the new connection, not written to the old.
        result = rx.device.wait_run(rid, 10)
        assert result.state == "succeeded"
        finals = [f for f in rx.device.frames if f.frame and f.frame.get("run_id") == rid
                  and f.frame.get("state") == "succeeded"]
        assert {f.connection for f in finals} == {2}
    finally:
        link.stop()


# 14 and 15 --------------------------------------------------------------------------------
def test_14_legacy_ack_first_then_result_echoing_id_and_command(oss_rx, make_client):
    px = make_client(oss_rx)
    px.on_command("set_led", lambda command, params: {"led": params["on"], "cmd": command})
    linked(px, oss_rx)
    result = oss_rx.device.call("set_led", {"on": True})
    assert result.events == ["ack", "result"]
    assert all(f["id"] == result.id and f["command"] == "set_led" for f in result.frames)
    assert result.result == {"led": True, "cmd": "set_led"}


def test_14_legacy_none_becomes_empty_and_exceptions_become_errors(oss_rx, make_client):
    px = make_client(oss_rx)
    px.on_command("nothing", lambda c, p: None)
    px.on_command("broken", lambda c, p: 1 / 0)
    linked(px, oss_rx)
    assert oss_rx.device.call("nothing").result == {}
    broken = oss_rx.device.call("broken")
    assert broken.events == ["ack", "error"] and broken.error == "division by zero"


def test_14_missing_id_and_command_are_echoed_as_empty(oss_rx, make_client):
    px = make_client(oss_rx)
    px.on_command("x", lambda c, p: None)
    linked(px, oss_rx)
    oss_rx.device.send_frame({"type": "typed_command"})
    frames = oss_rx.device.wait_frame(lambda f: f.type == "command_result", count=2)
    assert [(f.frame["id"], f.frame["command"], f.frame["event"]) for f in frames] == [
        ("", "", "ack"), ("", "", "error")]
    assert frames[1].frame["error"] == "unknown command: "


def test_15_unknown_legacy_command_and_reject_while_running(oss_rx, make_client):
    px = make_client(oss_rx)
    gate = Gate()
    px.on_command("calibrate", lambda c, p: gate(None), concurrency="reject")
    linked(px, oss_rx)
    unknown = oss_rx.device.call("nope")
    assert unknown.events == ["ack", "error"] and unknown.error == "unknown command: nope"
    first = oss_rx.device.send_command("calibrate")
    assert gate.entered.wait(5)
    second = oss_rx.device.call("calibrate")
    assert second.events == ["ack", "error"]
    assert second.error == "command already in progress: calibrate"
    gate.release.set()
    assert oss_rx.device.wait_legacy(first).result == {"released": True}


# 16 and 17 --------------------------------------------------------------------------------
def test_16_acknowledged_running_succeeded_numbered_1_2_3(rx, make_client, plexus_receiver):
    px = make_client(rx)
    px.command("ping")(lambda run: "pong")
    linked(px, rx)
    result = rx.device.run("ping")
    assert result.states == ["acknowledged", "running", "succeeded"]
    assert [s["seq"] for s in result.statuses] == [1, 2, 3]
    assert result.result == {"value": "pong"}


@pytest.mark.parametrize(("params", "ttl_ms", "code"), [
    ({"x": 1}, 30000, "bad_params"),
    ({}, 0, "expired_on_arrival"),
    ({}, -5, "expired_on_arrival"),
])
def test_17_rejections_are_a_single_failed_status(rx, make_client, params, ttl_ms, code):
    px = make_client(rx)
    calls = []
    px.command("go")(lambda run: calls.append(1))
    linked(px, rx)
    result = rx.device.run("go", params, ttl_ms=ttl_ms)
    assert result.states == ["failed"] and result.statuses[0]["seq"] == 1
    assert result.error_code == code
    assert calls == []


def test_17_unknown_command_and_busy(rx, make_client):
    px = make_client(rx)
    gate = Gate()
    px.command("calibrate", concurrency="reject")(gate)
    linked(px, rx)
    unknown = rx.device.run("nope")
    assert unknown.states == ["failed"] and unknown.error_code == "unknown_command"
    assert unknown.error_message == "unknown command: nope"
    first = rx.device.send_run("calibrate")
    assert gate.entered.wait(5)
    busy = rx.device.run("calibrate")
    assert busy.states == ["failed"] and busy.error_code == "busy"
    gate.release.set()
    assert rx.device.wait_run(first).state == "succeeded"
    assert rx.device.run("calibrate").state == "succeeded"  # free again at once
    assert gate.calls == 2


def test_17_missing_or_non_numeric_ttl_means_no_deadline(rx, make_client):
    px = make_client(rx)
    remaining = []
    px.command("probe")(lambda run: remaining.append(run.time_remaining))
    linked(px, rx)
    assert rx.device.run("probe", ttl_ms=None).state == "succeeded"
    assert rx.device.run("probe", ttl_ms="soon").state == "succeeded"
    assert rx.device.run("probe", ttl_ms=True).state == "succeeded"
    assert rx.device.run("probe", ttl_ms=20000).state == "succeeded"
    assert remaining[:3] == [None, None, None]
    assert 15 < remaining[3] <= 20


def test_17_a_run_without_run_id_is_ignored(rx, make_client):
    px = make_client(rx)
    calls = []
    px.command("go")(lambda run: calls.append(1))
    linked(px, rx)
    rx.device.send_frame({"type": "command_run", "command": "go", "params": {}})
    rx.device.send_frame({"type": "command_run", "run_id": "", "command": "go"})
    assert rx.device.run("go").state == "succeeded"  # the link goes on; only this one ran
    assert calls == [1]


# 18 ---------------------------------------------------------------------------------------
def test_18_a_run_id_never_runs_twice(rx, make_client):
    px = make_client(rx)
    calls = []
    px.command("increment")(lambda run: calls.append(run.id) or len(calls))
    linked(px, rx)
    first = rx.device.run("increment", run_id="run-1")
    assert first.states == ["acknowledged", "running", "succeeded"]
    again = rx.device.wait_run(rx.device.send_run("increment", run_id="run-1"), after_seq=3)
    final = again.statuses[-1]
    assert final["state"] == "succeeded" and final["seq"] == 4
    assert final["result"] == {"value": 1}
    assert calls == ["run-1"]


def test_18_redelivery_while_running_resends_the_current_state(rx, make_client):
    px = make_client(rx)
    gate = Gate()
    px.command("slow")(gate)
    linked(px, rx)
    rx.device.send_run("slow", run_id="run-2")
    assert gate.entered.wait(5)
    rx.device.send_run("slow", run_id="run-2", attempt=2)
    statuses = rx.device.wait_frame(
        lambda f: f.frame is not None and f.frame.get("run_id") == "run-2", count=3)
    assert [(s.frame["seq"], s.frame["state"]) for s in statuses] == [
        (1, "acknowledged"), (2, "running"), (3, "running")]
    gate.release.set()
    assert rx.device.wait_run("run-2").state == "succeeded"
    assert gate.calls == 1


# 19 ---------------------------------------------------------------------------------------
def test_19_parameters_are_coerced_and_checked(rx, make_client):
    px = make_client(rx)
    px.command("power", params={
        "outlet": {"type": "integer", "minimum": 1, "maximum": 8},
        "on": {"type": "boolean"},
        "volts": {"type": "number", "default": 12.0},
        "label": {"type": "string", "maxLength": 5, "required": False},
    })(echo)
    linked(px, rx)
    ok = rx.device.run("power", {"outlet": "8", "on": "true"})
    assert ok.result == {"outlet": 8, "on": True, "volts": 12.0}
    assert rx.device.run("power", {"outlet": 3.0, "on": 0, "volts": "5"}).result == {
        "outlet": 3, "on": False, "volts": 5.0}
    for params, message in [
        ({"outlet": 1, "on": True, "extra": 1}, "unknown parameter(s): extra"),
        ({"outlet": True, "on": True}, "outlet must be an integer, got a boolean"),
        ({"outlet": 9, "on": True}, "outlet must be at most 8, got 9"),
        ({"outlet": 2.5, "on": True}, "outlet must be an integer, got 2.5"),
        ({"on": True}, "missing required parameter: outlet"),
        ({"outlet": 1, "on": "yes"}, "on must be true or false, got 'yes'"),
        ({"outlet": 1, "on": True, "label": "toolong"}, "label must be at most 5 characters"),
    ]:
        result = rx.device.run("power", params)
        assert result.error_code == "bad_params", params
        assert message in result.error_message


# 20 ---------------------------------------------------------------------------------------
def test_20_progress_at_most_once_a_second_clamped_and_100_always_sent(rx, make_client):
    px = make_client(rx)

    def flash(run):
        run.progress(-5, "start")     # sent, clamped to 0
        run.progress(20)              # within a second: dropped
        run.progress("half")          # not a number: ignored
        run.progress(150, "done")     # 100: always sent
        return None

    px.command("flash")(flash)
    linked(px, rx)
    result = rx.device.run("flash")
    assert [(s["state"], s.get("progress"), s.get("message")) for s in result.statuses] == [
        ("acknowledged", None, None), ("running", None, None), ("progress", 0.0, "start"),
        ("progress", 100.0, "done"), ("succeeded", None, None)]
    assert [s["seq"] for s in result.statuses] == [1, 2, 3, 4, 5]


# 21 ---------------------------------------------------------------------------------------
def test_21_return_values_and_exceptions_map_to_statuses(rx, make_client):
    px = make_client(rx)
    px.command("none")(lambda run: None)
    px.command("number")(lambda run: 5)
    px.command("listing")(lambda run: [1, 2])

    def boom(run):
        raise ValueError("boom")

    def stop(run):
        raise Cancelled("operator said stop")

    def stop_quietly(run):
        raise Cancelled()

    for name, handler in (("boom", boom), ("stop", stop), ("stop_quietly", stop_quietly)):
        px.command(name)(handler)
    linked(px, rx)
    assert wait_until(lambda: len(rx.device.auths[-1].get("commands", [])) == 6)
    assert rx.device.run("none").result == {}
    assert rx.device.run("number").result == {"value": 5}
    assert rx.device.run("listing").result == {"value": [1, 2]}
    boom_result = rx.device.run("boom")
    assert (boom_result.error_code, boom_result.error_message) == ("handler_error",
                                                                   "ValueError: boom")
    assert rx.device.run("stop").error_message == "operator said stop"
    assert rx.device.run("stop").error_code == "cancelled"
    assert rx.device.run("stop_quietly").error_message == "cancelled by the handler"


# 22 ---------------------------------------------------------------------------------------
def test_22_statuses_are_kept_until_acked_and_replayed_after_command_sync(rx, make_client):
    rx.device.auto_ack = False
    px = make_client(rx)
    gate = Gate()
    px.command("slow")(gate)
    linked(px, rx)
    rid = rx.device.send_run("slow")
    assert gate.entered.wait(5)
    rx.device.drop()  # the link drops mid-run
    assert wait_until(lambda: px.link_state != "up")
    gate.release.set()
    assert rx.device.wait_connected(connections=2, timeout=10)
    frames = rx.device.wait_frame(lambda f: f.connection == 2, count=4)
    kinds = [(f.type, f.frame.get("state"), f.frame.get("seq")) for f in frames[:4]]
    assert kinds[0][0] == "command_sync"
    assert frames[0].frame["runs"] == [{"run_id": rid, "state": "succeeded", "seq": 3}]
    assert kinds[1:] == [("command_status", "acknowledged", 1),
                         ("command_status", "running", 2), ("command_status", "succeeded", 3)]
    # Acknowledged now: nothing is replayed after the next reconnect.
    rx.device.send_frame({"type": "command_status_ack", "run_id": rid, "seq": 3})
    assert wait_until(lambda: px._commands.kept == 0)
    rx.device.drop()
    assert rx.device.wait_connected(connections=3, timeout=10)
    time.sleep(0.2)
    assert [f for f in rx.device.frames if f.connection == 3] == []


def test_22_acked_statuses_are_forgotten(rx, make_client):
    px = make_client(rx)
    px.command("quick")(echo)
    linked(px, rx)
    assert rx.device.run("quick").state == "succeeded"
    assert wait_until(lambda: px._commands.kept == 0)


# 23 ---------------------------------------------------------------------------------------
def test_23_status_frames_stay_within_64_kib_dropping_the_result_first(rx, make_client):
    px = make_client(rx)
    px.command("huge")(lambda run: {"blob": "x" * 200_000})
    linked(px, rx)
    result = rx.device.run("huge")
    assert result.state == "succeeded" and "result" not in result.final
    assert all(len(f.raw) <= 64 * 1024 for f in rx.device.frames)


def test_23_a_smaller_max_frame_bytes_is_honoured(plexus_receiver_factory, make_client):
    rx = plexus_receiver_factory(ws_max_frame_bytes=300)
    px = make_client(rx)

    def fail_loudly(run):
        raise RuntimeError("e" * 1000)

    px.command("fail_loudly")(fail_loudly)
    px.command("small")(lambda run: {"ok": 1})
    linked(px, rx)
    loud = rx.device.run("fail_loudly")
    assert loud.state == "failed" and loud.error_code == "handler_error"
    assert "error_message" not in loud.final
    assert rx.device.run("small").result == {"ok": 1}
    assert all(len(f.raw) <= 300 for f in rx.device.frames)


def test_23_store_results_false_strips_results_and_messages(plexus_receiver_factory,
                                                            make_client):
    rx = plexus_receiver_factory(ws_store_results=False)
    px = make_client(rx)
    px.command("secretive")(lambda run: run.progress(100, "private") or {"pin": 1234})
    px.command("broken")(lambda run: 1 / 0)
    linked(px, rx)
    result = rx.device.run("secretive")
    assert result.state == "succeeded" and "result" not in result.final
    assert all("message" not in s for s in result.statuses)
    broken = rx.device.run("broken")
    assert broken.error_code == "handler_error" and "error_message" not in broken.final


def test_23_an_unserialisable_result_is_sent_as_its_repr(rx, make_client):
    px = make_client(rx)
    px.command("odd")(lambda run: {"when": object()})
    linked(px, rx)
    result = rx.device.run("odd")
    assert result.state == "succeeded"
    assert result.result["value"].startswith("{'when': <object object at")


# 24 ---------------------------------------------------------------------------------------
def test_24_unknown_types_non_json_and_binary_frames_are_ignored(rx, make_client):
    px = make_client(rx)
    px.command("ping")(lambda run: "pong")
    linked(px, rx)
    for garbage in ("not json", "[1, 2]", '{"type": "future_frame"}', '{"no": "type"}',
                    b"\x00\x01binary", '{"type": "error", "code": "INVALID_MESSAGE"}'):
        rx.device.send_raw(garbage)
    assert rx.device.run("ping").result == {"value": "pong"}
    assert rx.device.connections == 1 and px.link_state == "up"
    assert wait_until(lambda: px._link.ignored >= 5)


def test_run_object_offers_the_documented_attributes(rx, make_client):
    px = make_client(rx)
    seen = {}

    def inspect_run(run, n):
        seen.update(id=run.id, command=run.command, params=run.params, attempt=run.attempt,
                    cancel=run.cancel_requested, remaining=run.time_remaining)

    px.command("inspect_run", params={"n": {"type": "integer", "default": 2}})(inspect_run)
    linked(px, rx)
    rx.device.run("inspect_run", run_id="r-9", attempt=3, ttl_ms=5000)
    assert seen["id"] == "r-9" and seen["command"] == "inspect_run"
    assert seen["params"] == {"n": 2} and seen["attempt"] == 3 and seen["cancel"] is False
    assert 0 < seen["remaining"] <= 5


def test_serve_blocks_until_close_then_closes_the_client(rx, make_client):
    px = make_client(rx)
    px.command("ping")(lambda run: "pong")
    threading.Timer(0.5, lambda: rx.device.wait_connected("pod-07", 5)
                    and rx.device.run("ping") and px.close()).start()
    started = time.monotonic()
    px.serve(timeout=20)
    assert time.monotonic() - started < 15
    assert px.link_state == "stopped"
    assert rx.device.statuses(rx.device.of_type("command_status")[0]["run_id"])[-1][
        "state"] == "succeeded"
