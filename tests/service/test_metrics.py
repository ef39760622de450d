"""The metrics endpoint, scraped by a real Prometheus (Debian's package), and /healthz."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.service.support import (
    FUNCS,
    GatewayProcess,
    PrometheusServer,
    free_port,
    wait_until,
)


def _rig(tmp_path, up_url: str, down_url: str, port: int, extra: str = "") -> object:
    rig = tmp_path / "rig.yaml"
    rig.write_text(
        f"source_id: rig-01\napi_key: plx_test\nmetrics: {{listen: '127.0.0.1:{port}', "
        "stale_after: 1}\nbatch: {interval: 0.05}\nretry: {base: 0.05, max_delay: 0.2}\n"
        "buffer: {max_points: 50, when_full: drop_oldest}\n" + extra +
        f"adapters:\n  - type: callable\n    name: seq\n    function: {FUNCS}:sequence\n"
        "    interval: 0.01\n"
        f"sinks:\n  - type: plexus\n    name: up\n    gateway_url: {up_url}\n"
        f"  - type: plexus\n    name: down\n    gateway_url: {down_url}\n")
    return rig


def value(prom: PrometheusServer, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_gateway_and_answers_queries(tmp_path, plexus_receiver_factory):
    up, down = plexus_receiver_factory(), plexus_receiver_factory()
    down.go_down()
    port = free_port()
    gw = GatewayProcess(_rig(tmp_path, up.url, down.url, port))
    prom = None
    try:
        gw.wait_log("metrics on")
        prom = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
        assert wait_until(lambda: value(prom, 'up{job="plexus"}') == 1, 30), prom.targets()
        assert wait_until(lambda: (value(prom, 'plexus_sink_delivered_points_total{sink="up"}')
                                   or 0) > 20, 30)
        assert wait_until(lambda: (value(
            prom, 'plexus_sink_dropped_points_total{sink="down",reason="buffer_full"}') or 0) > 0,
            30)
        assert value(prom, 'plexus_sink_delivering{sink="down"}') == 0
        assert value(prom, 'plexus_sink_dropped_points_total{sink="up",reason="buffer_full"}') == 0
        assert value(prom, 'plexus_adapter_points_total{adapter="seq",type="callable"}') > 20
        assert value(prom, 'plexus_adapter_state{adapter="seq",state="connected"}') == 1
        assert value(prom, 'plexus_sink_buffered_points{sink="down"}') > 0
        assert value(prom, 'plexus_info{source_id="rig-01"}') == 1
        assert value(prom, "plexus_healthy") == 0  # the down sink, for longer than stale_after
        assert value(prom, "process_resident_memory_bytes") > 0

        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 503
        assert "sink down: nothing delivered for" in health.text
        assert "sink up" not in health.text
    finally:
        if prom is not None:
            prom.stop()
        assert gw.stop() == 0, gw.log


def test_healthz_is_200_and_ok_while_all_is_well(tmp_path, plexus_receiver_factory):
    up = plexus_receiver_factory()
    port = free_port()
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {up.url}\n"
                   f"metrics: {{listen: '127.0.0.1:{port}'}}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n    metric: t\n")
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert (answer.status_code, answer.text) == (200, "ok\n")
        assert httpx.get(f"http://127.0.0.1:{port}/nothing", timeout=5).status_code == 404
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        from prometheus_client.parser import text_string_to_metric_families

        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"plexus_sink_delivered_points", "plexus_sink_dropped_points",
                "plexus_sink_upload_lag_seconds", "plexus_adapter_errors"} <= names
    finally:
        assert gw.stop() == 0, gw.log


def test_a_refused_key_makes_healthz_say_so(tmp_path, plexus_receiver_factory):
    rx = plexus_receiver_factory(api_keys=["plx_other"])
    port = free_port()
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_wrong\ngateway_url: {rx.url}\n"
                   f"metrics: {{listen: '127.0.0.1:{port}'}}\nbatch: {{interval: 0.05}}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n    metric: t\n"
                   "    interval: 0.05\n")
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")

        def refused() -> bool:
            answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            return answer.status_code == 503 and "refuses the API key" in answer.text

        assert wait_until(refused, 20)
    finally:
        assert gw.stop() == 77, gw.log  # ExitCode.AUTH, as without the endpoint


def test_a_busy_port_fails_the_start_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rig = tmp_path / "rig.yaml"
        rig.write_text(f"source_id: rig-01\napi_key: plx_k\nmetrics: {{listen: '127.0.0.1:{port}'}}\n"
                       f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                       "    metric: t\n")
        gw = GatewayProcess(rig)
        code = gw.wait(30)
    assert code == 69, gw.log  # ExitCode.UNAVAILABLE: systemd tries again later
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in gw.log


def test_check_reports_a_busy_metrics_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rig = tmp_path / "rig.yaml"
        rig.write_text(f"source_id: rig-01\napi_key: plx_k\n"
                       f"metrics: {{listen: '127.0.0.1:{port}'}}\n"
                       f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                       "    metric: t\n")
        result = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig),
                                 "--check"], capture_output=True, text=True)
    assert result.returncode == 78, result.stderr
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("listen", ["9273", "localhost:http", "127.0.0.1:70000"])
def test_a_bad_listen_address_is_a_config_error(tmp_path, listen):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_k\nmetrics: {{listen: '{listen}'}}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                   "    metric: t\n")
    result = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 78, result.stderr
    assert "metrics.listen" in result.stderr and "expected host:port" in result.stderr


def test_import_plexus_does_not_load_prometheus_client():
    code = "import sys, plexus; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
