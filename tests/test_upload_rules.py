"""Upload rules: a byte budget per sink, and metrics held while a condition holds.

Rates and arrival times are measured from the local receiver's own records
(``RequestRecord.received_at`` and ``body_bytes``, or the moment each point
passes its checks), over windows long enough that the assertions are about
the behaviour, not the machine's speed.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from plexus.buffer import MemoryBuffer
from plexus.cli.status import summary
from plexus.conditions import ConditionCheck, HoldGate, default_route_interface, interface_is_up
from plexus.config import ConfigErrors, load_config_text
from plexus.gateway import Gateway
from plexus.pipeline import Pipeline
from plexus.plugins import load_plugins
from plexus.point import Point
from plexus.sinks.base import SendResult, Sink
from plexus.sinks.file import FileSink, FileSinkOptions
from plexus.sinks.stdout import StdoutSink
from plexus.testing import Receiver
from plexus.upload_rules import ByteBudget, ConditionSpec, MetricRouter, UploadRules
from tests.support import FakeClock, wait_until

REPO = Path(__file__).resolve().parent.parent
FUNCS = Path(__file__).resolve().parent / "gateway_funcs.py"


def build(text: str, tmp_path: Path) -> Gateway:
    registry = load_plugins()
    config = load_config_text(text, str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    return Gateway(config, registry)


def load(text: str) -> Any:
    registry = load_plugins()
    return load_config_text(text, "rig.yaml", adapter_types=registry.adapters,
                            sink_types=registry.sinks)


class Arrivals:
    """Stamps each point as the receiver accepts it: (time, metric, value)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, point: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append((time.time(), point["metric"], point["value"]))

    def of(self, prefix: str) -> list[tuple[float, str, Any]]:
        with self._lock:
            return [a for a in self.seen if a[1].startswith(prefix)]


def rig(url: str, upload: str, tmp_path: Path, buffer: str = "sqlite", extra: str = "") -> str:
    buf = (f"buffer: {{type: sqlite, path: {tmp_path / 'buf' / 'rig.db'}}}\n"
           if buffer == "sqlite" else "buffer: {type: memory}\n")
    return (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {url}\n{buf}"
            f"batch: {{interval: 0.05}}\n{extra}sinks:\n  - type: plexus\n    upload:\n{upload}")


# --- the rig file ------------------------------------------------------------------------------

def test_upload_rules_load_with_their_defaults() -> None:
    config = load("buffer: {type: sqlite}\nsinks:\n  - type: plexus\n    upload:\n"
                  "      max_bytes_per_s: 20000\n      hold: ['camera.*']\n"
                  "      always: ['camera.alert']\n"
                  "      hold_while: {default_route: wwan0}\n")
    rules = config.sinks[0].upload
    assert rules.max_bytes_per_s == 20000 and rules.burst_bytes is None
    assert rules.hold == ["camera.*"] and rules.always == ["camera.alert"]
    assert rules.condition.kind == "default_route" and rules.condition.interval == 1.0
    assert rules.holds_when_true
    assert rules.describe_hold() == "camera.* while the default route is wwan0"
    command = load("buffer: {type: sqlite}\nsinks:\n  - type: plexus\n    upload:\n"
                   "      hold: ['*']\n      hold_unless: {command: 'true'}\n").sinks[0].upload
    assert command.condition.interval == 10.0 and command.condition.timeout == 5.0
    assert not command.holds_when_true


BAD_RULES = [
    ("hold without a condition", "      hold: ['a.*']\n",
     ["rig.yaml:5", "sinks[0].upload", "hold needs a condition"]),
    ("both conditions", "      hold: ['a.*']\n      hold_while: {file: /x}\n"
     "      hold_unless: {file: /y}\n", ["sinks[0].upload", "not both"]),
    ("two kinds in one condition", "      hold: ['a.*']\n"
     "      hold_while: {file: /x, interface_up: eth0}\n",
     ["sinks[0].upload.hold_while", "exactly one of", "file, interface_up"]),
    ("a condition without hold", "      hold_while: {file: /x}\n",
     ["a hold condition needs the metrics to hold"]),
    ("always without hold", "      always: ['a.*']\n", ["always only makes exceptions"]),
    ("burst without a rate", "      burst_bytes: 100\n", ["burst_bytes needs max_bytes_per_s"]),
    ("a rate of zero", "      max_bytes_per_s: 0\n",
     ["sinks[0].upload.max_bytes_per_s", "must be at least 1"]),
    ("misspelt key", "      max_bytes_per_sec: 10\n",
     ["sinks[0].upload.max_bytes_per_sec", "unknown key", "max_bytes_per_s"]),
    ("a bad interface name", "      hold: ['a']\n      hold_while: {interface_up: 'wl an0'}\n",
     ["not a network interface name"]),
    ("a check interval of zero", "      hold: ['a']\n      hold_while: {file: /x, every: 0}\n",
     ["sinks[0].upload.hold_while.every", "must be greater than 0"]),
]


@pytest.mark.parametrize("upload,words", [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES])
def test_bad_upload_rules_are_clear_errors(upload: str, words: list[str]) -> None:
    with pytest.raises(ConfigErrors) as info:
        load("buffer: {type: sqlite}\nsinks:\n  - type: plexus\n    name: plexus\n"
             f"    upload:\n{upload}")
    for word in words:
        assert word in str(info.value)


def test_holding_with_the_memory_buffer_is_an_error_naming_the_line() -> None:
    with pytest.raises(ConfigErrors) as info:
        load("sinks:\n  - type: plexus\n    upload:\n      hold: ['camera.*']\n"
             "      hold_while: {file: /run/on-cellular}\n")
    message = str(info.value)
    assert "rig.yaml:4: sinks[0].upload.hold: holding data needs the persistent buffer" in message
    # A byte budget alone is fine with any buffer.
    load("sinks:\n  - type: plexus\n    upload: {max_bytes_per_s: 1000}\n")


def test_upload_is_a_key_of_sinks_only() -> None:
    with pytest.raises(ConfigErrors, match=r"adapters\[0\].upload: unknown key"):
        load("adapters:\n  - type: callable\n    function: m:f\n    upload: {}\n")


def test_check_prints_the_rules(tmp_path: Path) -> None:
    rig_file = tmp_path / "rig.yaml"
    rig_file.write_text("source_id: rig-01\napi_key: plx_x\nbuffer: {type: sqlite}\n"
                        f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                        "    metric: m\nsinks:\n  - type: plexus\n"
                        "    upload:\n      max_bytes_per_s: 5000\n      hold: ['cam.*']\n"
                        "      hold_unless: {interface_up: wlan0}\n")
    rig_file.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "plexus.cli", "--config", str(rig_file),
                           "--check"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "upload at most 5,000 bytes/s (burst 5,000)" in proc.stdout
    assert "hold cam.* unless interface wlan0 is up" in proc.stdout


# --- routing -----------------------------------------------------------------------------------

def test_the_router_decides_once_per_metric_and_always_wins_over_hold() -> None:
    live: list[Point] = []
    held: list[Point] = []
    router = MetricRouter(["camera.*", "lidar.?"], ["camera.alert*"], live.append, held.append,
                          live.extend, held.extend)
    for metric in ["camera.frame", "camera.alert", "camera.alerts.fire", "lidar.a", "lidar.ab",
                   "imu.x", "camera.frame"]:
        router.put((metric, 1.0, 0, None))
    assert [p[0] for p in held] == ["camera.frame", "lidar.a", "camera.frame"]
    assert [p[0] for p in live] == ["camera.alert", "camera.alerts.fire", "lidar.ab", "imu.x"]
    assert len(router._routes) == 6  # one entry per metric name
    router.put_many([("camera.x", 1, 0, None), ("imu.y", 2, 0, None)])
    assert held[-1][0] == "camera.x" and live[-1][0] == "imu.y"


def test_the_route_cache_is_bounded() -> None:
    sink: list[Point] = []
    router = MetricRouter(["a.*"], [], sink.append, sink.append, sink.extend, sink.extend)
    router.MAX_CACHED = 100
    for n in range(1000):
        router.put((f"m{n}", 1.0, 0, None))
    assert len(router._routes) <= 100 and len(sink) == 1000


# --- the budget ----------------------------------------------------------------------------------

def test_the_budget_lets_a_burst_go_then_paces_to_the_rate() -> None:
    clock = FakeClock(100.0)
    budget = ByteBudget(1000, 4000, clock=clock)
    assert budget.delay(4000) == 0.0  # a full bucket: one burst at once
    budget.charge(4000)
    assert budget.delay(0) == 0.0  # debt == burst: nothing expected, may go
    assert budget.delay(500) == pytest.approx(0.5)  # room for 500 bytes in 0.5 s
    clock.now += 0.5
    assert budget.delay(500) == 0.0
    budget.charge(500)
    # A request larger than the burst waits for an empty bucket, then goes alone.
    assert budget.delay(10_000) == pytest.approx(4.0)
    clock.now += 4.0
    assert budget.delay(10_000) == 0.0
    budget.charge(10_000)
    assert budget.delay(0) == pytest.approx(6.0)  # its excess is paid before the next one
    assert budget.charged == 14_500


def _windows_within_budget(requests: list[Any], rate: float, burst: float,
                           slack: float = 0.3, min_window: float = 2.0) -> None:
    """Over every window of at least ``min_window`` seconds between two requests, the
    bytes received stay within rate * window + burst + the largest request."""
    sent = [r for r in requests if r.body_bytes]
    largest = max(r.body_bytes for r in sent)
    windows = 0
    for i in range(len(sent)):
        total = 0
        for j in range(i, len(sent)):
            total += sent[j].body_bytes
            span = sent[j].received_at - sent[i].received_at
            if span >= min_window:
                windows += 1
                assert total <= rate * (span + slack) + burst + largest, (
                    f"{total} bytes in {span:.2f} s (budget {rate}/s, burst {burst}, "
                    f"largest request {largest})")
    assert windows > 0


@pytest.mark.parametrize("buffer", ["memory", "sqlite"])
def test_max_bytes_per_s_caps_the_bytes_on_the_wire(tmp_path: Path, buffer: str) -> None:
    """A producer of about twice the budget: the receiver sees at most the budget."""
    rate, burst = 3000, 3000
    with Receiver(api_keys=None) as rx:
        gateway = build(rig(rx.url, f"      max_bytes_per_s: {rate}\n", tmp_path, buffer), tmp_path)
        gateway.start()
        rng = random.Random(5)
        sent = 0
        try:
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                for _ in range(8):  # random values barely compress: ~13 bytes a point
                    gateway.pipeline.emit("rig.noise", rng.random())
                sent += 8
                time.sleep(0.02)
            lane = gateway.pipeline.lanes[0]
            assert lane.budget is not None and lane.budget.waited > 0  # it did hold back
            _windows_within_budget(rx.requests, rate, burst)
            # What waited is delivered, at the same pace, none lost.
            assert wait_until(lambda: rx.count >= sent, timeout=60)
        finally:
            gateway.shutdown(1.0)
        _windows_within_budget(rx.requests, rate, burst)
        assert rx.count == sent and rx.duplicates == 0
        status = gateway.status()["sinks"][0]
        assert status["max_bytes_per_s"] == rate
        assert status["bytes_sent"] == sum(r.body_bytes for r in rx.requests)


class QuietPostSink(Sink):
    """A plugin sink that posts gzipped bodies and never calls record_sent()."""

    type_name = "quiet_post"

    def __init__(self, url: str) -> None:
        super().__init__(None, "quiet")
        self.url = url
        self.client = httpx.Client()
        self.source_id = ""

    def open(self, source_id: str) -> None:
        self.source_id = source_id

    def send(self, points: list[Point], key: str) -> SendResult:
        rows = [{"metric": m, "value": v, "timestamp": t} for m, v, t, _ in points]
        body = gzip.compress(orjson.dumps({"source_id": self.source_id, "points": rows}))
        response = self.client.post(self.url, content=body, headers={
            "x-api-key": "plx_test", "Content-Encoding": "gzip"})
        response.raise_for_status()
        return SendResult(len(points))

    def close(self) -> None:
        self.client.close()


def test_a_sink_that_never_reports_bytes_is_kept_to_the_budget_by_an_estimate(caplog) -> None:
    rate = 3000
    with Receiver(api_keys=None) as rx:
        pipeline = Pipeline("rig-01")
        pipeline.add_lane(QuietPostSink(f"{rx.url}/ingest"), MemoryBuffer(100_000),
                          rules=UploadRules(max_bytes_per_s=rate), interval=0.05)
        pipeline.start()
        rng = random.Random(3)
        try:
            with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
                end = time.monotonic() + 5.0
                while time.monotonic() < end:
                    for _ in range(20):
                        pipeline.emit("rig.noise", rng.random())
                    time.sleep(0.02)
        finally:
            pipeline.close(0.5)
        assert "does not report the bytes it sends" in caplog.text
        assert pipeline.lanes[0].budget.charged > 0
        # The estimate (the points' JSON) is larger than the gzipped body: on the safe side.
        _windows_within_budget(rx.requests, rate, rate)


def test_file_and_stdout_sinks_report_what_they_write(tmp_path: Path, capsys) -> None:
    file_sink = FileSink(FileSinkOptions(path=str(tmp_path / "out.jsonl")))
    file_sink.open("rig-01")
    stdout_sink = StdoutSink()
    stdout_sink.open("rig-01")
    points = [("a.b", 1.5, 1_700_000_000_000, None), ("c", "text", 1_700_000_000_001, {"k": "v"})]
    file_sink.send(points, "k1")
    stdout_sink.send(points, "k1")
    file_sink.close()
    assert file_sink.bytes_sent == (tmp_path / "out.jsonl").stat().st_size > 0
    assert stdout_sink.bytes_sent == len(capsys.readouterr().out.encode()) > 0


# --- conditions --------------------------------------------------------------------------------

def test_file_condition(tmp_path: Path) -> None:
    flag = tmp_path / "on-cellular"
    check = ConditionCheck(ConditionSpec(file=str(flag)))
    assert check() is False
    flag.touch()
    assert check() is True


def test_command_condition_exit_status_and_timeout(tmp_path: Path, caplog) -> None:
    state = tmp_path / "link"
    state.write_text("cellular\n")
    check = ConditionCheck(ConditionSpec(command=f"grep -q cellular {state}"))
    assert check() is True
    state.write_text("wifi\n")
    assert check() is False
    # A command that hangs is killed (its children too) and tells nothing.
    slow = ConditionCheck(ConditionSpec(command="sleep 30 & sleep 30", timeout=0.3))
    started = time.monotonic()
    assert slow() is None
    assert time.monotonic() - started < 10
    with caplog.at_level(logging.WARNING, logger="plexus.upload"):
        assert ConditionCheck(ConditionSpec(command="no-such-command-xyz"))() is False
    assert "could not run" in caplog.text and "127" in caplog.text


def _fake_net(root: Path, name: str, flags: int, operstate: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "flags").write_text(f"0x{flags:x}\n")
    (root / name / "operstate").write_text(operstate + "\n")


def test_interface_state_from_sysfs(tmp_path: Path) -> None:
    # The real loopback interface (always up, operstate "unknown"), and one that is not there.
    assert interface_is_up("lo") is True
    assert interface_is_up("nosuchif0") is False
    # The sys_net seam: Wi-Fi administratively up but not associated, a modem up.
    _fake_net(tmp_path, "wlan0", 0x1003, "dormant")
    _fake_net(tmp_path, "wwan0", 0x1091, "up")
    _fake_net(tmp_path, "eth1", 0x1002, "down")
    assert not interface_is_up("wlan0", tmp_path)
    assert interface_is_up("wwan0", tmp_path)
    assert not interface_is_up("eth1", tmp_path)
    check = ConditionCheck(ConditionSpec(interface_up="wwan0"), sys_net=tmp_path)
    assert check() is True


def test_default_route_from_the_routing_tables(tmp_path: Path) -> None:
    # The real table, compared with what `ip` says where it is installed.
    ip = shutil.which("ip")
    if ip:
        out = subprocess.run([ip, "-4", "route", "show", "default"], capture_output=True,
                             text=True).stdout.split()
        expected = out[out.index("dev") + 1] if "dev" in out else None
        if expected is not None:
            assert default_route_interface() == expected
    head = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n")
    (tmp_path / "route").write_text(
        head
        + "wwan0\t00000000\t0100000A\t0003\t0\t0\t700\t00000000\t0\t0\t0\n"
        + "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        + "wlan0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n")
    assert default_route_interface(tmp_path) == "wlan0"  # the lowest metric wins
    (tmp_path / "route").write_text(head)
    v6 = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
          "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wwan0\n"
          "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
          "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n")
    (tmp_path / "ipv6_route").write_text(v6)
    assert default_route_interface(tmp_path) == "wwan0"  # no IPv4 default: the IPv6 one
    (tmp_path / "ipv6_route").write_text(v6.splitlines()[1] + "\n")
    assert default_route_interface(tmp_path) is None  # only the "unreachable" route on lo


# --- holding -----------------------------------------------------------------------------------

def _emit_for(gateway: Gateway, seconds: float, counts: dict[str, int],
              metrics: tuple[str, ...] = ("cam.frame", "cam.alert", "imu.x")) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for metric in metrics:
            gateway.pipeline.emit(metric, counts.get(metric, 0))
            counts[metric] = counts.get(metric, 0) + 1
        time.sleep(0.01)


def test_hold_while_a_file_exists(tmp_path: Path) -> None:
    flag = tmp_path / "on-cellular"
    flag.touch()
    arrivals = Arrivals()
    with Receiver(api_keys=None, extra_check=arrivals) as rx:
        gateway = build(rig(rx.url, "      hold: ['cam.*']\n      always: ['cam.alert']\n"
                                    f"      hold_while: {{file: {flag.name}, every: 0.1}}\n",
                            tmp_path), tmp_path)
        gateway.start()
        counts: dict[str, int] = {}
        try:
            _emit_for(gateway, 2.0, counts)
            assert wait_until(lambda: len(arrivals.of("imu.x")) >= counts["imu.x"])
            status = gateway.status()["sinks"][0]
            assert status["holding"] and status["held"] == counts["cam.frame"]
            line = summary(gateway.status())
            assert f"held {counts['cam.frame']} (HOLDING: cam.* while" in line
            alerts_before = counts["cam.alert"]
            released_at = time.time()
            flag.unlink()
            _emit_for(gateway, 0.5, counts)
            assert wait_until(lambda: len(arrivals.of("cam.frame")) >= counts["cam.frame"])
        finally:
            gateway.shutdown(5.0)
    # Nothing held went out while the file existed; what is never held went at once.
    frames = arrivals.of("cam.frame")
    assert frames and min(t for t, _, _ in frames) >= released_at
    assert sorted(v for _, _, v in frames) == list(range(counts["cam.frame"]))
    alerts = arrivals.of("cam.alert")
    assert sorted(v for _, _, v in alerts) == list(range(counts["cam.alert"]))
    assert {v for t, _, v in alerts if t < released_at} == set(range(alerts_before))
    assert rx.duplicates == 0


def test_hold_unless_a_command_succeeds_and_the_override_seam(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.write_text("cellular\n")
    arrivals = Arrivals()
    with Receiver(api_keys=None, extra_check=arrivals) as rx:
        gateway = build(rig(rx.url, "      hold: ['cam.*']\n      hold_unless:\n"
                                    f"        command: grep -q wifi {link}\n"
                                    "        every: 0.2\n", tmp_path), tmp_path)
        gateway.start()
        counts: dict[str, int] = {}
        gate = gateway.hold_gate("plexus")
        try:
            _emit_for(gateway, 1.5, counts)
            assert wait_until(lambda: len(arrivals.of("imu.x")) >= counts["imu.x"])
            assert arrivals.of("cam.") == [] and gate.holding
            link.write_text("wifi\n")  # the check passes: held points go
            assert wait_until(lambda: len(arrivals.of("cam.frame")) >= counts["cam.frame"])
            # A remote command could force the hold back on while Wi-Fi is up...
            gate.set_override(True)
            forced_at = time.time()
            _emit_for(gateway, 1.0, counts)
            assert wait_until(lambda: len(arrivals.of("imu.x")) >= counts["imu.x"])
            assert gateway.status()["sinks"][0]["held"] > 0
            # ...and give it back to the condition (Wi-Fi is up, so they go).
            gate.set_override(None)
            assert wait_until(lambda: len(arrivals.of("cam.frame")) >= counts["cam.frame"])
        finally:
            gateway.shutdown(5.0)
    late = [t for t, _, v in arrivals.of("cam.frame") if t >= forced_at]
    assert late and all(t >= forced_at + 0.9 for t in late)
    assert rx.duplicates == 0


def test_held_points_survive_a_restart_and_go_when_the_hold_clears(tmp_path: Path) -> None:
    flag = tmp_path / "hold"
    flag.touch()
    with Receiver(api_keys=None) as rx:
        text = rig(rx.url, f"      hold: ['cam.*']\n      hold_while: {{file: {flag}, "
                           "every: 0.1}\n", tmp_path)
        gateway = build(text, tmp_path)
        gateway.start()
        counts: dict[str, int] = {}
        _emit_for(gateway, 1.0, counts)
        assert wait_until(lambda: rx.count >= counts["imu.x"])
        gateway.shutdown(5.0)  # returns without waiting for the held lane
        assert "cam.frame" not in rx.metrics()
        held_file = tmp_path / "buf" / "rig.held" / "plexus.db"
        assert held_file.exists()
        flag.unlink()
        second = build(text, tmp_path)
        second.start()
        try:
            assert wait_until(lambda: len(rx.metrics().get("cam.frame", [])) >= counts["cam.frame"])
        finally:
            second.shutdown(5.0)
        assert sorted(rx.metrics()["cam.frame"]) == list(range(counts["cam.frame"]))
        assert rx.duplicates == 0


def test_a_full_held_buffer_warns_how_long_until_it_drops_and_never_stalls_producers(
        tmp_path: Path, caplog) -> None:
    flag = tmp_path / "hold"
    flag.touch()
    with Receiver(api_keys=None) as rx:
        gateway = build(rig(rx.url, f"      hold: ['cam.*']\n      hold_while: {{file: {flag}}}\n",
                            tmp_path).replace("buffer: {type: sqlite, path:",
                                              "buffer: {type: sqlite, max_points: 2000, path:"),
                        tmp_path)
        held = None
        with caplog.at_level(logging.INFO, logger="plexus.upload"):
            gateway.start()
            try:
                held = gateway.pipeline.lanes[0].held
                # 1.5x the cap in held points, at most 300 a second (so the fill is
                # seen on its way up): producers must not wait for room in a lane
                # that does not move (when_full is "block").
                done = threading.Event()

                def produce() -> None:
                    for n in range(3000):
                        gateway.pipeline.emit("cam.frame", n)
                        gateway.pipeline.emit("imu.x", n)
                        if n % 15 == 0:
                            time.sleep(0.05)
                    done.set()

                producer = threading.Thread(target=produce, daemon=True)
                producer.start()
                assert done.wait(120), "a producer waited on the held lane"
                assert wait_until(lambda: "dropped since the hold began" in caplog.text, 10)
                assert wait_until(lambda: rx.count >= 3000)  # the live lane kept going
            finally:
                gateway.shutdown(1.0)
    text = caplog.text
    assert "the held buffer is 8" in text or "the held buffer is 9" in text
    assert "the oldest held points will be dropped in about" in text
    assert held is not None and held.buffer.dropped > 0


def test_flush_and_close_do_not_wait_for_held_points(tmp_path: Path) -> None:
    flag = tmp_path / "hold"
    flag.touch()
    with Receiver(api_keys=None) as rx:
        gateway = build(rig(rx.url, f"      hold: ['cam.*']\n      hold_while: {{file: {flag}}}\n",
                            tmp_path), tmp_path)
        gateway.start()
        counts: dict[str, int] = {}
        _emit_for(gateway, 0.5, counts)
        assert gateway.pipeline.flush(timeout=30) is False  # held points stay, on purpose
        assert rx.metrics().get("imu.x") == list(range(counts["imu.x"]))
        closer = threading.Thread(target=gateway.shutdown, args=(30.0,))
        closer.start()
        closer.join(20)  # the 30 s grace is not spent on a lane that holds
        assert not closer.is_alive()
        assert "cam.frame" not in rx.metrics()


def test_a_hold_gate_starts_shut_and_keeps_state_when_the_check_cannot_tell() -> None:
    answers: list[bool | None] = [None, True, None, False, None]
    rules = UploadRules(hold=["a"], hold_while=ConditionSpec(file="/x", every=0.05))
    buffer = MemoryBuffer(100)
    gate = HoldGate("s", rules, buffer, check=lambda: answers.pop(0) if answers else None)
    seen = []
    gate.start()
    try:
        for _ in range(200):
            seen.append(gate.holding)
            if not answers:
                break
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        gate.stop()
    assert seen[0] is True  # shut before the first answer
    assert gate.holding is False and gate.condition_true is False
    assert gate.checks >= 5


# --- a real interface: a veth pair in a private network namespace -------------------------------

def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a network namespace and a veth pair)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c",
         "mount -t sysfs sysfs /sys && ip link add pxa type veth peer name pxb"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a veth pair in a network namespace here: {probe.stderr.strip()}"
    return None


def test_interface_and_default_route_conditions_on_a_real_interface() -> None:
    """In a private network namespace (so the machine's own network is untouched): a veth
    pair whose far end goes down and up, and a default route that moves between two."""
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    script = Path(__file__).resolve().parent / "netns_hold.py"
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c",
         f'mount -t sysfs sysfs /sys && exec "{sys.executable}" "{script}"'],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = orjson.loads(proc.stdout.strip().splitlines()[-1])
    marks = result["marks"]
    margin = 0.6  # the check runs every 0.1 s; a request may be on its way when a hold begins
    for sink, (hold_from, hold_to) in (("interface", ("pxb_down", "pxb_up")),
                                       ("route", ("route_to_pxa", "route_to_pxc"))):
        seen = result["arrivals"][sink]
        emitted = {v: t for t, v in result["emitted"]}
        cam = [(t, v) for t, m, v in seen if m == "cam.frame"]
        assert sorted(v for _, v in cam) == list(range(len(emitted))), sink
        start, end = marks[hold_from], marks[hold_to]
        # Emitted while the hold was on: arrived only after it ended.
        during = [(t, v) for t, v in cam if start + margin <= emitted[v] < end]
        assert during, sink
        assert all(t >= end for t, _ in during), sink
        # Emitted while it was off: not held until it ended.
        before = [(t, v) for t, v in cam if emitted[v] < start - margin]
        assert before and all(t < end for t, _ in before), sink
        imu = [t for t, m, _ in seen if m == "imu.x"]
        assert any(start + margin < t < end for t in imu), sink  # live data kept flowing
