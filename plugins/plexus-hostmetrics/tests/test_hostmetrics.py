"""plexus-hostmetrics through a real gateway pipeline, delivered to the local receiver."""

from __future__ import annotations

import time
from pathlib import Path

from plexus_hostmetrics import read_cpu_times, read_meminfo, read_temperatures

from plexus.config import load_config_text
from plexus.gateway import Gateway
from plexus.plugins import load_plugins


def fake_proc(root: Path, busy: int, idle: int) -> None:
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (root / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:         100 kB\n"
                                  "MemAvailable:    250 kB\n")
    (root / "loadavg").write_text("0.50 0.40 0.30 1/100 4242\n")
    (root / "uptime").write_text("1234.5 999.0\n")


def test_readers_parse_proc_and_sys(tmp_path):
    fake_proc(tmp_path, busy=300, idle=700)
    assert read_cpu_times(tmp_path) == (300, 1000)
    assert read_meminfo(tmp_path)["MemAvailable"] == 250 * 1024
    zone = tmp_path / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("47500\n")
    (zone / "type").write_text("cpu-thermal\n")
    assert read_temperatures(tmp_path) == [("cpu-thermal", 47.5)]


def test_real_host_metrics_reach_the_receiver(plexus_receiver, tmp_path):
    registry = load_plugins()
    assert "hostmetrics" in registry.adapters
    config = load_config_text(
        f"source_id: host-1\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
        "batch:\n  interval: 0.05\nadapters:\n  - type: hostmetrics\n    interval: 0.1\n",
        str(tmp_path / "rig.yaml"), adapter_types=registry.adapters, sink_types=registry.sinks,
    )
    gateway = Gateway(config, registry)
    gateway.start()
    try:
        deadline = time.monotonic() + 10
        while "host.cpu.percent" not in plexus_receiver.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gateway.shutdown(2.0)
    metrics = plexus_receiver.metrics()
    assert 0.0 <= metrics["host.cpu.percent"][0] <= 100.0
    assert 0.0 < metrics["host.memory.used_percent"][0] < 100.0
    assert metrics["host.uptime_seconds"][0] > 0
    disk = [p for p in plexus_receiver.points if p["metric"] == "host.disk.free_bytes"]
    assert disk[0]["tags"] == {"mount": "/"}


def test_fake_proc_values_are_computed_right(plexus_receiver, tmp_path):
    fake_proc(tmp_path, busy=300, idle=700)
    registry = load_plugins()
    config = load_config_text(
        f"source_id: host-1\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
        "batch:\n  interval: 0.05\nadapters:\n  - type: hostmetrics\n    interval: 0.1\n"
        f"    proc: {tmp_path}\n    sys: {tmp_path}\n    disks: []\n",
        str(tmp_path / "rig.yaml"), adapter_types=registry.adapters, sink_types=registry.sinks,
    )
    gateway = Gateway(config, registry)
    gateway.start()
    time.sleep(0.15)
    fake_proc(tmp_path, busy=400, idle=800)  # 100 busy of 200 jiffies: 50%
    assert plexus_receiver.wait_for(10, timeout=10)
    time.sleep(0.3)
    gateway.shutdown(2.0)
    metrics = plexus_receiver.metrics()
    assert 50.0 in metrics["host.cpu.percent"]
    assert metrics["host.memory.used_percent"][0] == 75.0
    assert metrics["host.load.1m"][0] == 0.5


def test_options_are_checked_when_the_rig_file_loads(tmp_path):
    import pytest

    from plexus.config import ConfigErrors

    registry = load_plugins()
    with pytest.raises(ConfigErrors) as info:
        load_config_text("adapters:\n  - type: hostmetrics\n    interval: 0\n    prefix: ''\n",
                         str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                         sink_types=registry.sinks)
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'rig.yaml'}:3: adapters[0].interval: must be greater than 0, got 0.0",
        f"{tmp_path / 'rig.yaml'}:4: adapters[0].prefix: string should have at least 1 character",
    ]
