"""Loss you can see on the dashboard: the gateway's own health as plexus.agent.* points.

On by default in plexus-gateway, opt-in for the embedded client, never counted
as user data in the figures they report, and with the persistent buffer the
drop and rejection counts survive a kill -9.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from plexus import Plexus
from plexus.sqlite_buffer import SqliteBuffer
from tests.reliability.support import make_client
from tests.service.support import FUNCS, GatewayProcess, wait_until
from tests.support import readings


def agent(receiver: Any, metric: str, **tags: str) -> list[Any]:
    """Values of one plexus.agent.* series, oldest first."""
    points = [p for p in receiver.points if p["metric"] == f"plexus.agent.{metric}"
              and all((p.get("tags") or {}).get(k) == v for k, v in tags.items())]
    return [p["value"] for p in sorted(points, key=lambda p: p["timestamp"])]


def stored_losses(path: Path) -> dict[str, int]:
    """The counts the buffer file holds, read as an outsider would (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())
    except sqlite3.OperationalError:  # the buffer is still being made
        return {}
    finally:
        conn.close()


def test_gateway_reports_its_health_as_points_that_count_only_user_data(tmp_path,
                                                                        plexus_receiver):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "tags: {vehicle: rover-7}\nbatch: {interval: 0.05}\n"
                   "agent_metrics: {interval: 1}\n"
                   f"adapters:\n  - type: callable\n    name: seq\n    function: {FUNCS}:sequence\n"
                   "    interval: 0.02\n")
    gw = GatewayProcess(rig)
    assert wait_until(lambda: len(agent(plexus_receiver, "delivered")) >= 3, 30), gw.log
    assert gw.stop() == 0, gw.log
    user = readings(plexus_receiver)
    delivered = agent(plexus_receiver, "delivered", sink="plexus")
    assert delivered == sorted(delivered) and delivered[-1] > 0
    # Every report counts user points only: never more than had arrived, and the run's
    # own total (the last status line) is exactly the user points stored.
    assert delivered[-1] <= len(user)
    assert f"delivered {len(user)}," in gw.log
    assert agent(plexus_receiver, "dropped", sink="plexus", reason="buffer_full")[-1] == 0
    assert agent(plexus_receiver, "rejected", sink="plexus")[-1] == 0
    assert agent(plexus_receiver, "adapter_errors", adapter="seq", kind="all")[-1] == 0
    assert all(v >= 0 for v in agent(plexus_receiver, "upload_lag_s", sink="plexus"))
    assert agent(plexus_receiver, "uptime_s")
    reports = [p for p in plexus_receiver.points if p["metric"].startswith("plexus.agent.")]
    assert all(p["tags"]["vehicle"] == "rover-7" for p in reports)  # the rig's tags, as any point


def test_drops_of_a_failing_sink_are_reported_by_reason_through_the_other(
        tmp_path, plexus_receiver_factory):
    up, down = plexus_receiver_factory(), plexus_receiver_factory()
    down.go_down()
    rig = tmp_path / "rig.yaml"
    rig.write_text("source_id: rig-01\napi_key: plx_test\nbatch: {interval: 0.05}\n"
                   "retry: {base: 0.05, max_delay: 0.2}\n"
                   "buffer: {max_points: 100, when_full: drop_oldest}\n"
                   "agent_metrics: {interval: 1}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n"
                   "    interval: 0.005\n"
                   f"sinks:\n  - type: plexus\n    name: up\n    gateway_url: {up.url}\n"
                   f"  - type: plexus\n    name: down\n    gateway_url: {down.url}\n")
    gw = GatewayProcess(rig)
    try:
        assert wait_until(lambda: any(v > 0 for v in agent(up, "dropped", sink="down",
                                                           reason="buffer_full")), 30), gw.log
        assert agent(up, "buffered", sink="down")[-1] > 0
        assert agent(up, "dropped", sink="up", reason="buffer_full")[-1] == 0
        assert agent(up, "retries", sink="down")[-1] > 0
        down.come_up()  # the reports that waited reach it too, once it is back
        assert wait_until(lambda: agent(down, "dropped", sink="down", reason="buffer_full"), 30)
    finally:
        assert gw.stop() == 0, gw.log


def test_drop_count_survives_kill_9(tmp_path, plexus_receiver_factory):
    rx = plexus_receiver_factory()
    rx.go_down()
    db = tmp_path / "buffer.db"
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {rx.url}\n"
                   "batch: {interval: 0.05}\nretry: {base: 0.05, max_delay: 0.2}\n"
                   f"buffer: {{type: sqlite, path: {db}, max_points: 400, when_full: drop_oldest,"
                   " sync_interval: 0.1}\nagent_metrics: {interval: 1}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n"
                   "    interval: 0.002\n")
    gw = GatewayProcess(rig)
    assert wait_until(lambda: db.exists() and stored_losses(db).get("buffer_full", 0) > 1000,
                      60), gw.log
    gw.signal(signal.SIGKILL)
    gw.wait()
    before = stored_losses(db)["buffer_full"]  # what the crash left on disk
    assert before > 1000
    shown = subprocess.run([sys.executable, "-m", "plexus.cli", "buffer", "--path", str(db)],
                           capture_output=True, text=True)
    assert f"lost since the file was made: buffer_full {before}" in shown.stdout, shown.stderr

    rx.come_up()
    again = GatewayProcess(rig)
    try:
        assert wait_until(lambda: agent(rx, "dropped", sink="plexus", reason="buffer_full"), 30)
        first = agent(rx, "dropped", sink="plexus", reason="buffer_full")[0]
        assert first >= before  # the count from before the crash, carried on
    finally:
        assert again.stop() == 0, again.log


def test_rejections_are_stored_with_the_acknowledgement(tmp_path, plexus_receiver_factory):
    rx = plexus_receiver_factory(extra_check=lambda p: "odd" if p.get("value", 0) % 2 else None)
    path = tmp_path / "b.db"
    with make_client(rx, persistent_buffer=True, buffer_path=path, flush_interval=60) as px:
        for i in range(20):
            px.send("seq", i)
        px.flush_buffer(timeout=10)
        # Read while the client still runs, as after a crash: the count is on disk already.
        assert stored_losses(path) == {"rejected": 10}
    buffer = SqliteBuffer(path)
    try:
        assert buffer.loss_counts() == {"buffer_full": 0, "rejected": 10}
    finally:
        buffer.close()


def test_a_reopened_buffer_carries_its_counts(tmp_path):
    path = tmp_path / "b.db"
    buffer = SqliteBuffer(path, max_points=40, when_full="drop_oldest", sync_interval=60)
    buffer.set_healthy(False)  # an outage: a full buffer drops the oldest
    for i in range(200):
        buffer.put(("m", i, 1_700_000_000_000 + i, None))
    buffer.sync()
    dropped = buffer.loss_counts()["buffer_full"]
    assert dropped >= 150
    assert stored_losses(path) == {"buffer_full": dropped}  # stored, not only counted
    buffer.close()
    again = SqliteBuffer(path, max_points=40, when_full="drop_oldest")
    try:
        assert again.loss_counts()["buffer_full"] == dropped
        assert again.dropped == 0  # this run's own count starts afresh
    finally:
        again.close()


def test_the_embedded_client_reports_only_when_asked(plexus_receiver):
    with make_client(plexus_receiver) as px:
        px.send("t", 1.0)
        px.flush_buffer()
    assert not [p for p in plexus_receiver.points if p["metric"].startswith("plexus.agent.")]

    plexus_receiver.clear()
    with make_client(plexus_receiver, agent_metrics=1.0) as px:
        for i in range(30):
            px.send("t", float(i))
        assert wait_until(lambda: agent(plexus_receiver, "delivered"), 15)
        px.flush_buffer()
        assert px.stats.delivered == 30  # the health points are not in the client's figures
    assert agent(plexus_receiver, "delivered", sink="plexus")[-1] == 30  # the last report
    assert len(readings(plexus_receiver)) == 30


def test_reports_wait_through_an_outage_in_a_bounded_side_queue(plexus_receiver):
    from plexus.service.agent import AgentReporter
    from plexus.service.figures import Figures

    with make_client(plexus_receiver) as px:
        figures = Figures("rig-01", adapters=list, lanes=lambda: px._pipeline.lanes)
        reporter = AgentReporter(px._pipeline, figures, interval=60, max_waiting=30)
        plexus_receiver.go_down()
        sizes = [reporter.report() for _ in range(10)]
        side = px._pipeline.lanes[0].uploader.side
        assert len(side) == 30 and side.dropped == sum(sizes) - 30  # the newest are kept
        assert px.buffer_size() == 0  # never in the user's buffer
        plexus_receiver.come_up()
        px.send("t", 1.0)
        px.flush_buffer(timeout=10)
        assert wait_until(lambda: len(side) == 0, 10)
    assert len([p for p in plexus_receiver.points if p["metric"].startswith("plexus.")]) == 30


def test_plexus_is_importable_without_the_service_package():
    import subprocess
    import sys

    code = "import sys, plexus; print(sorted(m for m in sys.modules if m.startswith('plexus.service')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
    assert Plexus  # the embedded client loads it only with agent_metrics
