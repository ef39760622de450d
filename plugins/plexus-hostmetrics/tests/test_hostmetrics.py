"""plexus-hostmetrics through a real gateway, delivered to the local receiver.

The gateway is run with the ``plexus_gateway`` fixture (plexus.testing.run_gateway):
a rig text in, a started gateway out, stopped at the end of the test.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from plexus_hostmetrics import read_cpu_times, read_meminfo, read_temperatures
from plexus_hostmetrics.history import HistoryOptions, HistorySink

from plexus.testing import check_rig


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


def test_real_host_metrics_reach_the_receiver(plexus_gateway, plexus_receiver):
    gateway = plexus_gateway("""
        adapters:
          - type: hostmetrics
            interval: 0.1
    """)
    assert gateway.wait_until(lambda: "host.cpu.percent" in plexus_receiver.metrics())
    assert gateway.adapter("hostmetrics")["state"] == "connected"
    gateway.stop()
    metrics = plexus_receiver.metrics()
    assert 0.0 <= metrics["host.cpu.percent"][0] <= 100.0
    assert 0.0 < metrics["host.memory.used_percent"][0] < 100.0
    assert metrics["host.uptime_seconds"][0] > 0
    disk = [p for p in plexus_receiver.points if p["metric"] == "host.disk.free_bytes"]
    assert disk[0]["tags"] == {"mount": "/"}


def test_fake_proc_values_are_computed_right(plexus_gateway, plexus_receiver, tmp_path):
    fake_proc(tmp_path, busy=300, idle=700)
    gateway = plexus_gateway(f"""
        adapters:
          - type: hostmetrics
            interval: 0.1
            proc: {tmp_path}
            sys: {tmp_path}
            disks: []
    """)
    assert gateway.wait_until(lambda: "host.load.1m" in plexus_receiver.metrics())
    fake_proc(tmp_path, busy=400, idle=800)  # 100 busy of 200 jiffies: 50%
    assert gateway.wait_until(lambda: 50.0 in plexus_receiver.metrics().get("host.cpu.percent", []))
    gateway.stop()
    metrics = plexus_receiver.metrics()
    assert metrics["host.memory.used_percent"][0] == 75.0
    assert metrics["host.load.1m"][0] == 0.5


def test_options_are_checked_when_the_rig_file_loads(tmp_path):
    problems = check_rig("""
        adapters:
          - type: hostmetrics
            interval: 0
            prefix: ''
    """, folder=tmp_path)
    assert problems == [
        f"{tmp_path / 'rig.yaml'}:3: adapters[0].interval: must be greater than 0, got 0.0",
        f"{tmp_path / 'rig.yaml'}:4: adapters[0].prefix: string should have at least 1 character",
    ]


# The history sink ----------------------------------------------------------------


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT metric, value, tags FROM points ORDER BY rowid").fetchall()


def test_history_keeps_the_host_metrics_beside_the_platform(plexus_gateway, plexus_receiver,
                                                            tmp_path):
    gateway = plexus_gateway("""
        adapters:
          - type: hostmetrics
            interval: 0.1
        sinks:
          - type: plexus
          - type: history
            path: history/host.db
            tags: {copy: local}
    """)
    db = tmp_path / "history" / "host.db"  # relative to the rig's folder
    assert gateway.wait_until(lambda: gateway.sink("history")["delivered"] >= 10)
    gateway.stop()
    stored = rows(db)
    assert {"host.uptime_seconds", "host.load.1m"} <= {metric for metric, _, _ in stored}
    assert all('"copy": "local"' in tags for _, _, tags in stored)
    assert "copy" not in (plexus_receiver.points[0].get("tags") or {})  # that sink's tags only


def test_history_stores_a_retried_batch_once_and_rejects_what_is_not_a_number(tmp_path):
    sink = HistorySink(HistoryOptions(path=str(tmp_path / "h.db")))
    sink.open("rig-1")
    now = int(time.time() * 1000)
    batch = [("cpu", 12.5, now, None), ("state", "ok", now, None), ("up", True, now, None),
             ("disk", 3, now, {"mount": "/"})]
    first = sink.send(batch, "key-1")
    again = sink.send(batch, "key-1")  # the same batch, its first answer lost
    sink.close()
    assert first.delivered == again.delivered == 2
    assert [index for index, _ in first.rejected] == [1, 2]
    assert rows(tmp_path / "h.db") == [("cpu", 12.5, None), ("disk", 3.0, '{"mount": "/"}')]


def test_history_that_cannot_open_is_found_by_check_and_isolated_at_run(
        plexus_gateway, plexus_receiver, tmp_path):
    (tmp_path / "blocked").write_text("a file where the folder should be")
    rig = """
        adapters:
          - type: hostmetrics
            interval: 0.1
        sinks:
          - type: plexus
          - type: history
            path: blocked/host.db
    """
    problems = check_rig(rig, receiver=plexus_receiver, folder=tmp_path)
    assert problems == [f"{tmp_path / 'rig.yaml'}:6: sinks[1] (history): cannot create "
                        f"{tmp_path / 'blocked' / 'host.db'}: {tmp_path / 'blocked'} is not "
                        "a folder"]
    gateway = plexus_gateway(rig)
    assert gateway.wait_until(lambda: plexus_receiver.count >= 10)  # the platform still gets all
    assert gateway.sink("history")["state"] == "opening"
    assert "next attempt in" in gateway.sink("history")["last_error"]


@pytest.mark.parametrize("text, problem", [
    ("keep_hours: 0", "keep_hours: must be greater than 0, got 0.0"),
    ("busy_timeout: -1", "busy_timeout: must be at least 0, got -1.0"),
])
def test_history_options_are_checked(tmp_path, text, problem):
    problems = check_rig(f"""
        adapters: [{{type: hostmetrics}}]
        sinks:
          - type: history
            path: h.db
            {text}
    """, folder=tmp_path)
    assert problems == [f"{tmp_path / 'rig.yaml'}:5: sinks[0].{problem}"]
