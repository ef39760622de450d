"""systemd's notify protocol against a real Unix datagram socket as NOTIFY_SOCKET.

READY once adapters and sinks are up, WATCHDOG from the main loop only while
nothing is stuck, STATUS, RELOADING (with MONOTONIC_USEC) and STOPPING; and
the unit file itself, checked by systemd-analyze.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from plexus import hookimpl
from plexus.config import load_config_text
from plexus.gateway import Gateway
from plexus.plugins import load_plugins
from plexus.service.notify import Notifier
from plexus.service.runner import Service
from plexus.sinks.base import SendResult, Sink
from tests.service.support import FUNCS, REPO, GatewayProcess, NotifySocket

UNIT = REPO / "contrib" / "systemd" / "plexus-gateway.service"


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


# --- the protocol itself -------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_each_message_is_one_datagram_of_key_value_lines(abstract):
    sock = NotifySocket(abstract=abstract)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": sock.address,
                                          "WATCHDOG_USEC": "4000000"})
        assert notifier.enabled and notifier.watchdog_interval == 2.0
        notifier.ready("3/3 adapters\nconnected")  # a newline would end the field
        notifier.reloading()
        notifier.stopping("bye")
        sock.wait_for("STOPPING")
        ready, reloading, stopping = (m for _, m in sock.messages)
        assert ready == {"READY": "1", "STATUS": "3/3 adapters connected"}
        assert reloading["RELOADING"] == "1"
        # CLOCK_MONOTONIC in microseconds, as systemd 253+ matches it to the reload it asked for
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 5_000_000
        assert stopping == {"STOPPING": "1", "STATUS": "bye"}
    finally:
        sock.close()


def test_outside_systemd_nothing_is_sent_and_nothing_fails():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    assert not notifier.watchdog_due()
    assert not notifier.send("READY=1")


def test_a_watchdog_meant_for_another_process_is_ignored(notify):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000",
                                      "WATCHDOG_PID": "1"})
    assert notifier.enabled and notifier.watchdog_interval is None


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "gone"))
    for _ in range(3):
        assert not notifier.send("WATCHDOG=1")
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


# --- a running plexus-gateway --------------------------------------------------------------


def test_gateway_lifecycle_over_the_notify_socket(tmp_path, notify, plexus_receiver):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "batch: {interval: 0.05}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n"
                   "    interval: 0.05\n")
    gw = GatewayProcess(rig, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
    try:
        (_, ready), = notify.wait_for("READY")
        assert "1/1 adapters connected" in ready["STATUS"]
        # the sink was open and the adapter running before READY: points follow at once
        assert plexus_receiver.wait_for(5, timeout=10)
        notify.wait_for("WATCHDOG", count=4)

        gw.signal(signal.SIGHUP)
        (_, reloading), = notify.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", count=2)  # the reload is done
        assert notify.with_key("STATUS")
    finally:
        code = gw.stop()
    assert code == 0, gw.log
    (_, stopping), = notify.wait_for("STOPPING")
    assert int(notify.with_key("EXTEND_TIMEOUT_USEC")[0][1]["EXTEND_TIMEOUT_USEC"]) >= 5_000_000
    assert "NOTIFY_SOCKET" not in gw.log  # unset for the process's children, never logged


def test_no_ping_while_the_process_is_frozen(tmp_path, notify, plexus_receiver):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                   "    metric: t\n")
    gw = GatewayProcess(rig, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "600000"})
    try:
        notify.wait_for("WATCHDOG", count=2)
        gw.signal(signal.SIGSTOP)
        time.sleep(0.5)  # a ping in flight lands
        frozen = len(notify.with_key("WATCHDOG"))
        time.sleep(1.5)
        assert len(notify.with_key("WATCHDOG")) == frozen  # systemd would kill it now
        gw.signal(signal.SIGCONT)
        notify.wait_for("WATCHDOG", count=frozen + 2)
    finally:
        gw.signal(signal.SIGCONT)
        assert gw.stop() == 0, gw.log


# --- what stops the pings, in-process ---------------------------------------------------


@dataclass
class StuckOptions:
    timeout: float = 0.2
    mode: str = "hang"  # hang: never answer; die: kill the uploader thread


class StuckSink(Sink):
    """A sink whose request never ends (a wedged driver), or whose uploader thread dies."""

    type_name = "stuck"
    Options = StuckOptions
    release = threading.Event()

    def send(self, points, key):
        if self.options.mode == "die":
            raise SystemExit("the uploader thread dies")  # not an Exception: the thread ends
        StuckSink.release.wait()
        return SendResult(len(points))


def _stuck_plugin() -> types.ModuleType:
    module = types.ModuleType("stuck_plugin")

    @hookimpl
    def plexus_register_sinks(register):
        register(StuckSink)

    module.plexus_register_sinks = plexus_register_sinks  # type: ignore[attr-defined]
    return module


def _service(tmp_path: Path, mode: str, notify: NotifySocket) -> tuple[Gateway, Service]:
    registry = load_plugins(extra={"stuck": _stuck_plugin()})
    config = load_config_text(
        "source_id: rig-01\nbatch: {interval: 0.05}\nagent_metrics: {enabled: false}\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.05\n"
        f"sinks:\n  - type: stuck\n    mode: {mode}\n",
        str(tmp_path / "rig.yaml"), adapter_types=registry.adapters, sink_types=registry.sinks)
    gateway = Gateway(config, registry)
    service = Service(gateway, Notifier(notify.address, watchdog_usec=200_000))
    gateway.start()
    service.started()
    return gateway, service


def _tick_for(service: Service, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        service.tick()  # what the main loop does every tick
        time.sleep(0.02)


def test_a_wedged_request_stops_the_pings_and_they_resume_when_it_ends(tmp_path, notify):
    StuckSink.release.clear()
    gateway, service = _service(tmp_path, "hang", notify)
    try:
        _tick_for(service, 0.3)
        assert notify.with_key("WATCHDOG")  # a request is out, but not for long yet
        # wedged after 3 x timeout (0.6 s) + 5 s on the wire
        assert wait_for_stuck(service, 10)
        pings = len(notify.with_key("WATCHDOG"))
        _tick_for(service, 1.0)
        assert len(notify.with_key("WATCHDOG")) == pings
        StuckSink.release.set()
        _tick_for(service, 0.5)
        assert len(notify.with_key("WATCHDOG")) > pings
    finally:
        StuckSink.release.set()
        gateway.shutdown(0.5)
        service.close()


def wait_for_stuck(service: Service, timeout: float) -> bool:
    from plexus.service.health import stuck

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.tick()
        if stuck(service.figures.snapshot()):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_uploader_thread_stops_the_pings(tmp_path, notify, caplog):
    gateway, service = _service(tmp_path, "die", notify)
    try:
        assert wait_for_stuck(service, 10)
        pings = len(notify.with_key("WATCHDOG"))
        _tick_for(service, 1.0)
        assert len(notify.with_key("WATCHDOG")) == pings
        assert "uploader thread is not running" in caplog.text
        assert "not pinging the systemd watchdog" in caplog.text
    finally:
        gateway.shutdown(0.2)
        service.close()


def test_only_the_main_loop_pings(tmp_path, notify):
    StuckSink.release.set()  # a healthy sink
    gateway, service = _service(tmp_path, "hang", notify)
    try:
        _tick_for(service, 0.5)
        assert notify.with_key("WATCHDOG")
        pings = len(notify.with_key("WATCHDOG"))
        time.sleep(1.0)  # uploader, adapter and every other thread run on; the loop does not
        assert len(notify.with_key("WATCHDOG")) == pings
    finally:
        gateway.shutdown(0.5)
        service.close()


# --- the unit file ---------------------------------------------------------------------


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    return path


def test_the_unit_file_verifies(tmp_path):
    analyze = _analyze()
    # verify wants ExecStart to exist: point it at this environment's command
    command = Path(shutil.which("plexus-gateway", path=str(Path(__import__("sys").executable)
                                                           .parent)) or "")
    assert command.is_file()
    unit = tmp_path / "plexus-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/plexus-gateway/bin/plexus-gateway",
                                             str(command)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # verify exits 0 even for a line it ignores: every complaint names the unit
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=",
                 "RestartPreventExitStatus=77 78", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text


def test_the_unit_file_is_hardened(tmp_path):
    analyze = _analyze()
    unit = tmp_path / "plexus-gateway.service"
    unit.write_text(UNIT.read_text())
    result = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True)
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip("this systemd-analyze cannot judge a unit offline (systemd < 250)")
    score = float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert score <= 3.0, result.stdout  # "OK" in systemd's words; an unhardened unit is 9.6
