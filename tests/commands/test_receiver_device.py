"""The local receiver's /ws/device as a raw WebSocket client sees it: the test oracle
must behave like the platform it stands in for."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.commands.conftest import wait_until


def auth(ws, source_id="dev-1", key="plx_test"):
    ws.send(json.dumps({"type": "device_auth", "api_key": key, "source_id": source_id}))
    return json.loads(ws.recv(timeout=5))


@pytest.mark.parametrize("generation", ["hosted", "oss"])
def test_authenticated_reply_per_generation(plexus_receiver_factory, generation):
    rx = plexus_receiver_factory(ws_generation=generation)
    with connect(rx.ws_url + "/ws/device") as ws:
        reply = auth(ws)
    assert reply["type"] == "authenticated" and reply["source_id"] == "dev-1"
    if generation == "oss":
        assert set(reply) == {"type", "source_id", "server_time_ms"}
    else:
        assert reply["protocol"] == 1 and reply["acks"] is True
        assert reply["max_frame_bytes"] == 65536


@pytest.mark.parametrize(("first", "message"), [
    ({"type": "hello"}, "first message must be device_auth"),
    ({"type": "device_auth", "api_key": "plx_test", "source_id": "Bad Id"},
     "first message must be device_auth"),
    ({"type": "device_auth", "api_key": "wrong", "source_id": "dev-1"}, "Invalid API key"),
])
def test_bad_auth_gets_an_error_frame_then_close_1008(rx, first, message):
    with connect(rx.ws_url + "/ws/device") as ws:
        ws.send(json.dumps(first))
        assert json.loads(ws.recv(timeout=5)) == {"type": "error", "message": message}
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd.code == 1008 and info.value.rcvd.reason == "auth failed"


def test_non_json_first_frame_closes_1008_without_an_error_frame(rx):
    with connect(rx.ws_url + "/ws/device") as ws:
        ws.send("hello")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd.code == 1008


def test_silence_drops_the_connection_without_a_close_frame(plexus_receiver_factory):
    rx = plexus_receiver_factory(ws_auth_timeout=0.2)
    with connect(rx.ws_url + "/ws/device") as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is None


def test_oss_refuses_hosted_frames_and_rate_limits_control_frames(plexus_receiver_factory):
    rx = plexus_receiver_factory(ws_generation="oss", ws_control_limit=(3, 0.001))
    with connect(rx.ws_url + "/ws/device") as ws:
        auth(ws)
        ws.send(json.dumps({"type": "command_status", "run_id": "r", "seq": 1,
                            "state": "running"}))
        assert json.loads(ws.recv(timeout=5)) == {
            "type": "error", "code": "INVALID_MESSAGE", "detail": "unknown message type"}
        for _ in range(4):
            ws.send(json.dumps({"type": "heartbeat", "source_id": "dev-1"}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "error", "code": "RATE_LIMITED"}
        ws.send("not json")
        assert json.loads(ws.recv(timeout=5)) == {"type": "error", "code": "INVALID_JSON"}
    assert rx.device.rate_limited == 1


def test_a_message_over_1_mib_closes_1009(rx):
    with connect(rx.ws_url + "/ws/device", max_size=None) as ws:
        auth(ws)
        ws.send("x" * (1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd.code == 1009


def test_a_second_connection_with_the_same_source_id_evicts_the_first(rx):
    with connect(rx.ws_url + "/ws/device") as first, \
            connect(rx.ws_url + "/ws/device") as second:
        auth(first)
        auth(second)
        with pytest.raises(ConnectionClosed) as info:
            first.recv(timeout=5)
        assert info.value.rcvd is None  # no close frame, as the platform does
        assert rx.device.connected("dev-1")


def test_internal_command_and_internal_run_over_http(rx):
    with connect(rx.ws_url + "/ws/device") as ws:
        auth(ws)
        answer = httpx.post(rx.url + "/internal/command", json={
            "org_id": "dev", "source_id": "dev-1", "command": "blink", "params": {"n": 2}})
        assert answer.status_code == 200 and answer.json()["queued"] is True
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "typed_command" and frame["command"] == "blink"
        assert frame["params"] == {"n": 2} and frame["id"] == answer.json()["id"]
        answer = httpx.post(rx.url + "/internal/run", json={
            "source_id": "dev-1", "command": "power_off", "params": {"outlet": 3},
            "ttl_ms": 5000})
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "command_run" and frame["run_id"] == answer.json()["run_id"]
        assert frame["ttl_ms"] == 5000 and frame["attempt"] == 1
    assert wait_until(lambda: not rx.device.connected("dev-1"))
    offline = httpx.post(rx.url + "/internal/command", json={
        "org_id": "dev", "source_id": "dev-1", "command": "blink"})
    assert offline.json() == {"queued": False}
    bad = httpx.post(rx.url + "/internal/command", json={"source_id": "dev-1"})
    assert bad.status_code == 400 and bad.text.strip() == "org_id, source_id, command required"
    bad = httpx.post(rx.url + "/internal/command", content=b"{")
    assert bad.status_code == 400 and bad.text.strip() == "invalid JSON"
    assert rx.requests == []  # the ingest record is not cluttered by these


def test_internal_secret_is_required_when_set(plexus_receiver_factory):
    rx = plexus_receiver_factory(internal_secret="s3")
    body = {"org_id": "dev", "source_id": "dev-1", "command": "x"}
    assert httpx.post(rx.url + "/internal/command", json=body).status_code == 401
    ok = httpx.post(rx.url + "/internal/command", json=body, headers={"x-internal-secret": "s3"})
    assert ok.json() == {"queued": False}
