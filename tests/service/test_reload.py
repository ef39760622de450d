"""SIGHUP to a running plexus-gateway: the rig file is re-read without losing a point."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.support import FUNCS, GatewayProcess, free_port, wait_until
from tests.support import readings


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def adapter_points(port: int, name: str) -> float:
    values = scrape(port)
    return next(v for (metric, labels), v in values.items()
                if metric == "plexus_adapter_points_total" and ("adapter", name) in labels)


def seq_values(receiver: Any) -> list[int]:
    return sorted(p["value"] for p in readings(receiver) if p["metric"] == "test.seq")


SEQ = f"  - type: callable\n    name: seq\n    function: {FUNCS}:sequence\n    interval: 0.01\n"


def test_a_valid_change_restarts_only_what_changed(tmp_path, plexus_receiver):
    port = free_port()
    head = (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
            f"metrics: {{listen: '127.0.0.1:{port}'}}\nbatch: {{interval: 0.05}}\n")
    temp = f"  - type: callable\n    name: temp\n    function: {FUNCS}:number\n    metric: t\n"
    rig = tmp_path / "rig.yaml"
    rig.write_text(head + "adapters:\n" + SEQ + temp + "    interval: 0.1\n")
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")
        assert wait_until(lambda: adapter_points(port, "seq") > 20)
        assert wait_until(lambda: adapter_points(port, "temp") > 3)
        rig.write_text(head + "tags: {fleet: north}\nadapters:\n" + SEQ + temp
                       + "    interval: 0.2\n"
                       + f"  - type: callable\n    name: pairs\n    function: {FUNCS}:pairs\n")
        before = adapter_points(port, "seq")
        gw.signal(signal.SIGHUP)
        log = gw.wait_log("reloaded ")
        assert "adapters: changed temp; added pairs; kept seq" in log
        assert "settings: tags" in log
        # seq was never restarted: its own count went on (a new adapter starts at 0)
        assert adapter_points(port, "seq") >= before
        assert adapter_points(port, "temp") < before  # temp was: it starts again
        assert wait_until(lambda: any(p["metric"] == "test.a" for p in plexus_receiver.points))
        assert wait_until(lambda: any((p.get("tags") or {}).get("fleet") == "north"
                                      for p in plexus_receiver.points))
        assert scrape(port)[("plexus_reloads_total", ())] == 1
    finally:
        assert gw.stop() == 0, gw.log
    values = seq_values(plexus_receiver)
    assert values == list(range(len(values)))  # nothing lost, nothing twice, across the reload


@pytest.mark.parametrize("broken,problem", [
    ("adapters: [\n", "invalid YAML"),
    ("adapters:\n  - type: canbus\n", "unknown adapter type 'canbus'"),
    ("retry: {base: fast}\nadapters: []\n", "retry.base"),
])
def test_an_invalid_file_changes_nothing(tmp_path, plexus_receiver, broken, problem):
    port = free_port()
    head = (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
            f"metrics: {{listen: '127.0.0.1:{port}'}}\nbatch: {{interval: 0.05}}\n")
    rig = tmp_path / "rig.yaml"
    rig.write_text(head + "adapters:\n" + SEQ)
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")
        assert wait_until(lambda: adapter_points(port, "seq") > 10)
        rig.write_text(head + broken)
        gw.signal(signal.SIGHUP)
        log = gw.wait_log("reload refused")
        assert problem in log and f"{rig}:" in log and "the running configuration is unchanged" \
            in log
        before = adapter_points(port, "seq")
        assert wait_until(lambda: adapter_points(port, "seq") > before + 10)  # still running
        assert scrape(port)[("plexus_reload_failures_total", ())] == 1

        rig.write_text(head + "adapters:\n" + SEQ)  # fixed: the next reload goes through
        gw.signal(signal.SIGHUP)
        assert "nothing changed" in gw.wait_log("reloaded ")
    finally:
        assert gw.stop() == 0, gw.log
    values = seq_values(plexus_receiver)
    assert values == list(range(len(values)))


@pytest.mark.parametrize("buffer", ["memory", "sqlite"])
def test_a_changed_sink_hands_its_pending_points_over(tmp_path, plexus_receiver_factory, buffer):
    old, new = plexus_receiver_factory(), plexus_receiver_factory()
    old.go_down()  # everything waits in the buffer
    port = free_port()
    store = f"buffer: {{type: sqlite, path: {tmp_path / 'b.db'}}}\n" if buffer == "sqlite" else ""
    rig = tmp_path / "rig.yaml"

    def write(url: str) -> None:
        rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {url}\n{store}"
                       f"metrics: {{listen: '127.0.0.1:{port}'}}\nbatch: {{interval: 0.05}}\n"
                       "retry: {base: 0.05, max_delay: 0.2}\nadapters:\n" + SEQ)

    write(old.url)
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")
        assert wait_until(lambda: scrape(port)[("plexus_sink_buffered_points",
                                                (("sink", "plexus"),))] > 200)
        write(new.url)
        gw.signal(signal.SIGHUP)
        assert "sinks: changed plexus" in gw.wait_log("reloaded ")
        assert wait_until(lambda: len(seq_values(new)) > 400)
    finally:
        assert gw.stop() == 0, gw.log
    values = seq_values(new)
    assert values == list(range(len(values)))  # what waited for the old sink, then the rest
    assert old.count == 0


def test_a_removed_sink_delivers_what_it_holds(tmp_path, plexus_receiver_factory):
    keep, drop = plexus_receiver_factory(), plexus_receiver_factory()
    rig = tmp_path / "rig.yaml"
    sinks = (f"sinks:\n  - type: plexus\n    name: keep\n    gateway_url: {keep.url}\n"
             f"  - type: plexus\n    name: drop\n    gateway_url: {drop.url}\n")
    head = "source_id: rig-01\napi_key: plx_test\nbatch: {interval: 0.05}\nadapters:\n" + SEQ
    rig.write_text(head + sinks)
    gw = GatewayProcess(rig)
    try:
        assert wait_until(lambda: len(seq_values(drop)) > 50)
        rig.write_text(head + sinks.split("  - type: plexus\n    name: drop")[0])
        gw.signal(signal.SIGHUP)
        assert "sinks: removed drop; kept keep" in gw.wait_log("reloaded ")
        stopped_at = len(seq_values(drop))
        assert wait_until(lambda: len(seq_values(keep)) > stopped_at + 100)
    finally:
        assert gw.stop() == 0, gw.log
    dropped, kept = seq_values(drop), seq_values(keep)
    assert dropped == list(range(len(dropped)))  # everything it had taken, delivered
    assert kept == list(range(len(kept))) and len(kept) > len(dropped)


def test_restart_only_keys_keep_their_running_values(tmp_path, plexus_receiver):
    rig = tmp_path / "rig.yaml"
    text = (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
            "batch: {interval: 0.05}\nadapters:\n" + SEQ)
    rig.write_text(text)
    gw = GatewayProcess(rig)
    try:
        assert plexus_receiver.wait_for(10)
        rig.write_text(text.replace("rig-01", "rig-02"))
        gw.signal(signal.SIGHUP)
        log = gw.wait_log("reloaded ")
        assert "source_id changed; it takes effect at the next restart" in log
        plexus_receiver.clear()
        assert plexus_receiver.wait_for(10)
    finally:
        assert gw.stop() == 0, gw.log
    assert {p["source_id"] for p in plexus_receiver.points} == {"rig-01"}


def test_reload_without_a_rig_change_is_harmless_and_quick_to_repeat(tmp_path, plexus_receiver):
    rig = Path(tmp_path / "rig.yaml")
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "batch: {interval: 0.05}\nadapters:\n" + SEQ)
    gw = GatewayProcess(rig)
    try:
        assert plexus_receiver.wait_for(10)
        for n in range(1, 4):
            gw.signal(signal.SIGHUP)
            gw.wait_log("reloaded ", count=n)
    finally:
        assert gw.stop() == 0, gw.log
    values = seq_values(plexus_receiver)
    assert values == list(range(len(values)))


def test_a_holding_sink_hands_its_held_points_over(tmp_path, plexus_receiver_factory):
    old, new = plexus_receiver_factory(), plexus_receiver_factory()
    metered = tmp_path / "metered"
    metered.touch()  # the hold is on: seq waits in the held buffer
    port = free_port()
    rig = tmp_path / "rig.yaml"

    def write(url: str) -> None:
        rig.write_text(
            f"source_id: rig-01\napi_key: plx_test\nbuffer: {{type: sqlite, path: {tmp_path / 'b.db'}}}\n"
            f"metrics: {{listen: '127.0.0.1:{port}'}}\nbatch: {{interval: 0.05}}\n"
            "agent_metrics: {enabled: false}\nadapters:\n" + SEQ +
            f"sinks:\n  - type: plexus\n    gateway_url: {url}\n"
            f"    upload: {{hold: ['test.*'], hold_while: {{file: {metered}}}}}\n")

    write(old.url)
    gw = GatewayProcess(rig)
    try:
        gw.wait_log("metrics on")
        assert wait_until(lambda: adapter_points(port, "seq") > 200)
        assert old.count == 0  # all held
        write(new.url)
        gw.signal(signal.SIGHUP)
        assert "sinks: changed plexus" in gw.wait_log("reloaded ")
        metered.unlink()  # the hold clears: what was held goes to the new sink
        assert wait_until(lambda: len(seq_values(new)) > 300, 30), gw.log
    finally:
        assert gw.stop() == 0, gw.log
    values = seq_values(new)
    assert values == list(range(len(values)))
    assert old.count == 0
