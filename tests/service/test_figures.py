"""The one snapshot every output reads: upload lag from counts, the link and commands."""

from __future__ import annotations

import httpx

from plexus.config import load_config_text
from plexus.gateway import Gateway
from plexus.plugins import load_plugins
from plexus.service.figures import LagTracker
from plexus.service.notify import Notifier
from plexus.service.runner import Service
from tests.service.support import FUNCS, wait_until
from tests.support import FakeClock


def test_upload_lag_is_the_wait_of_the_oldest_point_from_counts_alone():
    clock = FakeClock()
    lag = LagTracker(clock)
    # 10 points a second enter; nothing leaves for 5 s (an outage)
    for second in range(6):
        clock.now = float(second)
        lag.sample(left=0, waiting=10 * second)
    # point 1 came between the ticks at t=0 and t=1: it has waited 4 to 5 s; the
    # answer is good to one tick, on the low side
    assert lag.lag(left=0, waiting=50) == 4.0
    # the link is back: 30 leave; point 31 came between t=3 and t=4
    lag.sample(left=30, waiting=20)
    assert lag.lag(left=30, waiting=20) == 1.0
    assert lag.lag(left=50, waiting=0) == 0.0  # nothing waits: no lag


def test_lag_memory_stays_bounded_through_a_long_outage():
    clock = FakeClock()
    lag = LagTracker(clock, max_samples=64)
    for second in range(10_000):
        clock.now = float(second)
        lag.sample(left=0, waiting=second + 1)
    assert len(lag._entered) <= 65
    assert lag.lag(left=0, waiting=10_000) == 9999.0  # the oldest tick is kept


def test_link_and_commands_are_in_the_metrics(tmp_path, plexus_receiver):
    registry = load_plugins()
    config = load_config_text(
        f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
        f"commands: {{enabled: true, ws_url: '{plexus_receiver.ws_url}'}}\n"
        "metrics: {listen: '127.0.0.1:0'}\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n    metric: t\n",
        str(tmp_path / "rig.yaml"), adapter_types=registry.adapters, sink_types=registry.sinks)
    gateway = Gateway(config, registry)
    service = Service(gateway, Notifier(None))
    service.open()
    gateway.start()
    service.started()
    try:
        assert wait_until(lambda: gateway.commands.link.up, 15)
        text = httpx.get(f"{service.metrics.url}/metrics", timeout=5).text
        assert "plexus_link_up 1.0" in text
        assert 'plexus_link_state{state="up"} 1.0' in text
        assert "plexus_link_connections_total 1.0" in text
        assert "plexus_command_runs_total 0.0" in text
    finally:
        gateway.shutdown(0.5)
        service.close()
