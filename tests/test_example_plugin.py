"""The example plugin, pip-installed like a user would, discovered and run through the gateway."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins" / "plexus-hostmetrics"


@pytest.fixture(scope="module")
def installed_plugin():
    # --no-build-isolation: build with the setuptools already in this environment,
    # so the test needs no network.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", str(PLUGIN)], check=True)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y",
                    "plexus-hostmetrics"], check=True)


def gateway_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "plexus.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_installed_plugin_is_listed_with_its_package_and_version(installed_plugin):
    result = gateway_cli("plugins")
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()) for line in result.stdout.splitlines()}
    assert ("adapter", "hostmetrics", "plexus-hostmetrics", "0.1.0") in rows
    assert ("sink", "history", "plexus-hostmetrics", "0.1.0") in rows


def test_plugin_points_reach_the_receiver_through_the_gateway(installed_plugin, plexus_receiver,
                                                               tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: host-1\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "batch:\n  interval: 0.1\nadapters:\n  - type: hostmetrics\n    interval: 0.2\n")
    result = gateway_cli("--config", str(rig), "--duration", "1.5", "--no-status")
    assert result.returncode == 0, result.stderr
    metrics = plexus_receiver.metrics()
    assert {"host.cpu.percent", "host.memory.used_percent", "host.disk.free_bytes"} <= set(metrics)


def test_disabled_plugin_is_not_loaded(installed_plugin, tmp_path):
    result = gateway_cli("plugins", env={"PLEXUS_DISABLE_PLUGINS": "hostmetrics"})
    assert " hostmetrics " not in result.stdout
    assert "disabled plugin: hostmetrics" in result.stdout
    rig = tmp_path / "rig.yaml"
    rig.write_text("source_id: host-1\nadapters:\n  - type: hostmetrics\n")
    result = gateway_cli("--config", str(rig), "--check",
                         env={"PLEXUS_DISABLE_PLUGINS": "hostmetrics"})
    assert result.returncode == 78  # an invalid rig file
    assert "unknown adapter type 'hostmetrics'" in result.stderr


def test_the_sample_rig_runs_with_the_history_sink(installed_plugin, tmp_path):
    rig = tmp_path / "hostmetrics.yaml"
    rig.write_text((PLUGIN / "hostmetrics.yaml").read_text().replace("interval: 5", "interval: 0.2"))
    result = gateway_cli("--config", str(rig), "--duration", "1.5", "--no-status",
                         env={"PLEXUS_API_KEY": "plx_unused"})
    assert result.returncode == 0, result.stderr
    assert "host.uptime_seconds=" in result.stdout  # the stdout sink
    import sqlite3

    with sqlite3.connect(tmp_path / "host-history.db") as db:
        stored = {row[0] for row in db.execute("SELECT metric FROM points")}
    assert "host.uptime_seconds" in stored


def test_the_plugins_own_tests_pass(installed_plugin):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(PLUGIN / "tests")], capture_output=True, text=True, timeout=120,
                            cwd=PLUGIN)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_plugins_command_runs_through_the_gateway(installed_plugin, plexus_receiver,
                                                      plexus_run_command, tmp_path):
    from plexus.config import load_config_text
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins

    registry = load_plugins()
    config = load_config_text(
        f"source_id: host-1\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
        f"commands:\n  enabled: true\n  ws_url: {plexus_receiver.ws_url}\n"
        f"  audit_file: {tmp_path / 'audit.jsonl'}\n"
        "adapters:\n  - type: hostmetrics\n    interval: 60\n",
        str(tmp_path / "rig.yaml"), adapter_types=registry.adapters, sink_types=registry.sinks)
    gateway = Gateway(config, registry)
    gateway.start()
    try:
        result = plexus_run_command("host_report")
    finally:
        gateway.shutdown(2.0)
    assert result.state == "succeeded", result.statuses
    assert result.result["uptime_seconds"] > 0 and result.result["load_1m"] >= 0
    assert "host.uptime_seconds" in plexus_receiver.metrics()
