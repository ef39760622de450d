"""The operator subcommands of plexus-gateway, run as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from plexus import Plexus
from plexus.cli import parse_value

CLI = [sys.executable, "-m", "plexus.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("text,value", [
    ("3450", 3450), ("-1.5", -1.5), ("true", True), ("False", False), ("running", "running"),
    ('{"x": 1}', {"x": 1}), ("[1, 2]", [1, 2]), ("{not json", "{not json"),
])
def test_values_from_the_shell(text, value):
    assert parse_value(text) == value


def test_send_goes_through_validation_and_delivery(plexus_receiver):
    env = {"PLEXUS_API_KEY": "plx_test", "PLEXUS_SOURCE_ID": "shell-1",
           "PLEXUS_GATEWAY_URL": plexus_receiver.url}
    result = run("send", "engine.rpm", "3450", "--tag", "rig=A", "--tag", "shift=night",
                 "--timestamp", "1700000000", env=env)
    assert result.returncode == 0, result.stderr
    assert plexus_receiver.points == [{
        "metric": "engine.rpm", "value": 3450, "timestamp": 1700000000000,
        "tags": {"rig": "A", "shift": "night"}, "source_id": "shell-1", "class": "metric",
    }]


def test_send_rejects_a_bad_point_with_a_clear_message(plexus_receiver):
    env = {"PLEXUS_API_KEY": "plx_test", "PLEXUS_GATEWAY_URL": plexus_receiver.url}
    result = run("send", "m" * 300, "1", env=env)
    assert result.returncode == 65  # ExitCode.DATA
    assert "metric must be 1..256" in result.stderr and "Traceback" not in result.stderr
    assert plexus_receiver.count == 0


def test_send_with_a_refused_key_fails(plexus_receiver):
    env = {"PLEXUS_API_KEY": "plx_wrong", "PLEXUS_GATEWAY_URL": plexus_receiver.url}
    result = run("send", "m", "1", env=env)
    assert result.returncode == 77 and "401" in result.stderr  # ExitCode.AUTH


def test_buffer_shows_and_flushes_a_persistent_buffer(plexus_receiver, tmp_path):
    path = tmp_path / "rig.db"
    plexus_receiver.go_down()
    px = Plexus(api_key="plx_test", source_id="rig-01", gateway_url=plexus_receiver.url,
                persistent_buffer=True, buffer_path=path)
    for i in range(25):
        px.send("seq", i, timestamp=1700000000 + i)
    px.close(timeout=0)

    shown = run("buffer", "--path", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "25 points" in shown.stdout
    assert "oldest: 2023-11-14 22:13:20.000Z" in shown.stdout
    assert "newest: 2023-11-14 22:13:44.000Z" in shown.stdout

    plexus_receiver.come_up()
    env = {"PLEXUS_API_KEY": "plx_test", "PLEXUS_SOURCE_ID": "rig-01",
           "PLEXUS_GATEWAY_URL": plexus_receiver.url}
    flushed = run("buffer", "--path", str(path), "--flush", env=env)
    assert flushed.returncode == 0, flushed.stderr
    assert sorted(p["value"] for p in plexus_receiver.points) == list(range(25))
    assert "0 points" in run("buffer", "--path", str(path)).stdout


def test_buffer_on_a_missing_file_is_a_clear_error(tmp_path):
    result = run("buffer", "--path", str(tmp_path / "nope.db"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_options_prints_a_types_options():
    result = run("options", "mqtt")
    assert result.returncode == 0
    assert "## adapter `mqtt`" in result.stdout and "| `topics` |" in result.stdout


def test_receiver_command_accepts_points_until_interrupted(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "receiver", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with Plexus(api_key="plx_any", source_id="rig-01", gateway_url=url) as px:
                    px.send("hello", 1.0)
                    px.flush_buffer(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    assert "hello" in out
