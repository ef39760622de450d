"""Security: the API key never leaks; TLS is verified by default; files are private."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plexus import AuthenticationError, Plexus, PlexusError
from plexus.sinks.http import HttpSink, HttpSinkOptions
from tests.reliability.support import REPO, LogCapture, child_env, files_under, values

CANARY = "plx_CANARY_7f3a9c2e51d84b06"
FUNCS = REPO / "tests" / "gateway_funcs.py"
GATEWAY = [sys.executable, "-m", "plexus.cli"]


def assert_no_canary(where: str, text: str | bytes) -> None:
    needle = CANARY.encode() if isinstance(text, bytes) else CANARY
    assert needle not in text, f"the API key appears in {where}"
    # Not even a recognisable part of it.
    part = CANARY[4:]
    assert (part.encode() if isinstance(text, bytes) else part) not in text, where


def scan_files(*roots: Path, allowed: set[Path] = frozenset()) -> list[Path]:  # type: ignore[assignment]
    scanned = []
    for f in files_under(*roots):
        if f in allowed or not f.is_file():
            continue
        assert_no_canary(str(f), f.read_bytes())
        scanned.append(f)
    return scanned


@pytest.mark.parametrize("accepted", [True, False], ids=["key-accepted", "key-refused-401"])
def test_client_never_shows_the_key(plexus_receiver_factory, tmp_path, isolated_home, accepted):
    rx = plexus_receiver_factory(api_keys=[CANARY if accepted else "plx_someone_else"])
    texts: list[str] = []
    buffer_dir = tmp_path / "buffer"
    with LogCapture() as logs:
        px = Plexus(api_key=CANARY, gateway_url=rx.url, persistent_buffer=True,
                    buffer_path=buffer_dir / "b.db", flush_interval=0.05, sync_interval=0.05)
        texts += [repr(px), str(px), repr(px._sink), repr(px._uploader.stats),
                  repr(px._pipeline.lanes)]
        for i in range(50):
            try:
                px.send("seq", i)
            except AuthenticationError as exc:
                texts += [str(exc), repr(exc)]
        try:
            px.flush_buffer(timeout=5)
        except PlexusError as exc:
            texts += [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
        try:
            px.send("seq", float("nan"))
        except PlexusError as exc:
            texts += [str(exc)]
        texts += [repr(px.stats), str(px.stats.last_error)]
        px.close(timeout=0.5)
    for text in texts:
        assert_no_canary("a repr or an exception", text)
    assert_no_canary("the logs", logs.text)
    assert len(logs.lines) > 5  # DEBUG logging was really on
    if accepted:
        assert sorted(values(rx)) == list(range(50))
    else:
        assert {r.status for r in rx.requests} == {401}
    assert scan_files(isolated_home, buffer_dir)  # config.json (generated source_id), buffer


def write_rig(path: Path, url: str, base: Path) -> Path:
    path.write_text(
        f"source_id: rig-01\napi_key: {CANARY}\ngateway_url: {url}\nlog_level: debug\n"
        f"buffer:\n  type: sqlite\n  path: {base / 'buf' / 'rig.db'}\n  sync_interval: 0.05\n"
        "batch:\n  interval: 0.05\ngrace_period: 1\nretry:\n  base: 0.01\n  max_delay: 0.05\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.02\n"
        f"sinks:\n  - type: plexus\n  - type: file\n    path: {base / 'out' / 'points.jsonl'}\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("accepted", [True, False], ids=["key-accepted", "key-refused-401"])
def test_gateway_and_cli_never_show_the_key(plexus_receiver_factory, tmp_path, isolated_home,
                                            accepted):
    rx = plexus_receiver_factory(api_keys=[CANARY if accepted else "plx_someone_else"])
    rig = write_rig(tmp_path / "rig.yaml", rx.url, tmp_path)
    env = child_env()
    outputs = {}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=60,
                                env=env, cwd=REPO)
        outputs[" ".join(args)] = result
        return result

    run = cli("--config", str(rig), "--duration", "2", "--no-status", "--log-level", "debug")
    # A refused key keeps the points buffered and says so with its own exit code.
    assert run.returncode == (0 if accepted else 77), run.stderr[-2000:]
    assert "DEBUG" in run.stderr
    check = cli("--config", str(rig), "--check", "--log-level", "debug")
    assert check.returncode == 0, check.stderr[-2000:]
    cli("send", "manual.reading", "42", "--config", str(rig), "--timeout", "2")
    db = tmp_path / "buf" / "rig.db"
    cli("buffer", "--path", str(db))
    cli("buffer", "--path", str(db), "--flush", "--config", str(rig), "--timeout", "2")
    for name, result in outputs.items():
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert_no_canary(f"stdout of {name}", result.stdout)
        assert_no_canary(f"stderr of {name}", result.stderr)
    if accepted:
        assert rx.count > 10
        assert "manual.reading" in {p["metric"] for p in rx.points}
    else:
        assert rx.count == 0 and {r.status for r in rx.requests} == {401}
    scanned = scan_files(isolated_home, tmp_path, allowed={rig})
    names = {f.name for f in scanned}
    assert {"rig.db", "points.jsonl"} <= names, names

    # In process: status(), reprs of the config and the gateway's objects.
    from plexus.config import load_config
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins

    registry = load_plugins()
    with LogCapture() as logs:
        config = load_config(rig, adapter_types=registry.adapters, sink_types=registry.sinks)
        gateway = Gateway(config, registry)
        gateway.start()
        try:
            texts = [repr(config), str(config), json.dumps(gateway.status(), default=repr),
                     repr([lane.sink for lane in gateway.pipeline.lanes]),
                     repr(config.sinks), repr(config.adapters)]
        finally:
            gateway.shutdown(0.5)
        texts.append(json.dumps(gateway.status(), default=repr))
    for text in texts:
        assert_no_canary("a repr or gateway.status()", text)
    assert_no_canary("the gateway's logs", logs.text)


def test_service_outputs_never_show_the_key(plexus_receiver_factory, tmp_path, isolated_home):
    """Log events, agent points, /metrics, /healthz, systemd's STATUS and a refused
    reload: none carries the key, even when user code logs it."""
    import signal

    import httpx

    from tests.service.support import GatewayProcess, NotifySocket, free_port, wait_until

    rx = plexus_receiver_factory(api_keys=[CANARY])
    port = free_port()
    rig = tmp_path / "rig.yaml"
    text = ("source_id: rig-01\napi_key: ${PLEXUS_API_KEY}\n"
            f"gateway_url: {rx.url}\nlog_level: debug\nlog_events: debug\n"
            f"metrics: {{listen: '127.0.0.1:{port}'}}\nagent_metrics: {{interval: 1}}\n"
            f"buffer: {{type: sqlite, path: {tmp_path / 'buf' / 'rig.db'}}}\n"
            "batch: {interval: 0.05}\nlog_events_per_minute: 600\n"
            "adapters:\n  - type: callable\n    function: tests.gateway_funcs:leaky\n"
            "    metric: leak\n    interval: 0.2\n"
            "  - type: callable\n    function: tests.gateway_funcs:broken\n    interval: 0.2\n")
    rig.write_text(text)
    rig.chmod(0o600)
    notify = NotifySocket()
    try:
        gw = GatewayProcess(rig, env={"PLEXUS_API_KEY": CANARY, "NOTIFY_SOCKET": notify.address,
                                      "WATCHDOG_USEC": "1000000"})
        try:
            assert wait_until(lambda: any("calling home" in str(p["value"])
                                          for p in rx.points), 30), gw.log
            assert wait_until(lambda: any(p["metric"].startswith("plexus.agent.")
                                          for p in rx.points), 30)
            texts = {path: httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text
                     for path in ("/metrics", "/healthz", "/")}
            rig.write_text(f"api_key: [{CANARY}]\n")  # invalid: the reload is refused
            gw.signal(signal.SIGHUP)
            gw.wait_log("reload refused")
            rig.write_text(text.replace("interval: 0.2", "interval: 0.3"))
            gw.signal(signal.SIGHUP)
            gw.wait_log("reloaded ")
        finally:
            assert gw.stop() == 0, gw.log
        messages = json.dumps([m for _, m in notify.messages])
    finally:
        notify.close()
    assert "READY" in messages and "STATUS" in messages
    assert_no_canary("the systemd notifications", messages)
    for path, body in texts.items():
        assert_no_canary(f"GET {path}", body)
    assert_no_canary("the points and events stored", json.dumps(rx.points))
    assert "plx_***" in json.dumps(rx.points)  # the user's log line, redacted in its event
    # The gateway's own log lines (user code's are its own business).
    own = [line for line in gw.log.splitlines() if "user.code" not in line]
    assert_no_canary("the gateway's log", "\n".join(own))
    assert scan_files(tmp_path / "buf")  # the buffer, its counters table included


def test_config_errors_never_show_the_key(tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"api_key: [{CANARY}]\nsource_id: 5\n")
    rig.chmod(0o600)
    result = subprocess.run([*GATEWAY, "--config", str(rig), "--check"], capture_output=True,
                            text=True, timeout=60, env=child_env(), cwd=REPO)
    assert result.returncode == 78 and "api_key" in result.stderr
    assert_no_canary("a config error", result.stderr)
    rig.write_text(f"api_key: {CANARY}\nsource_id: rig-01\nbuffer: {{type: sqlite, bogus: 1}}\n")
    result = subprocess.run([*GATEWAY, "--config", str(rig), "--check"], capture_output=True,
                            text=True, timeout=60, env=child_env(), cwd=REPO)
    assert result.returncode == 78
    assert_no_canary("a config error", result.stderr)


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_verification_is_on_by_default_and_off_warns(caplog):
    assert HttpSink().options.verify_tls is True
    assert HttpSinkOptions().verify_tls is True
    from plexus.config import GatewaySettings

    assert GatewaySettings().verify_tls is True
    caplog.set_level(logging.WARNING)
    sink = HttpSink(HttpSinkOptions(verify_tls=False), api_key=CANARY,
                    gateway_url="https://example.invalid")
    sink.open("rig-01")  # must not connect
    sink.close()
    assert any("TLS" in r.getMessage() and "OFF" in r.getMessage() for r in caplog.records)
    assert_no_canary("the logs", caplog.text)


def test_plain_http_to_a_remote_host_warns_and_loopback_does_not(caplog):
    caplog.set_level(logging.WARNING)
    remote = HttpSink(api_key=CANARY, gateway_url="http://example.invalid")
    remote.open("rig-01")  # must not connect (example.invalid does not even resolve)
    remote.close()
    warned = [r.getMessage() for r in caplog.records if "http://" in r.getMessage()]
    assert warned and "example.invalid" in warned[0]
    caplog.clear()
    for url in ("http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9"):
        local = HttpSink(api_key=CANARY, gateway_url=url)
        local.open("rig-01")
        local.close()
    assert not [r for r in caplog.records if "http://" in r.getMessage()]
    assert_no_canary("the logs", caplog.text)


def test_plexus_with_verify_tls_off_warns(caplog):
    caplog.set_level(logging.WARNING)
    px = Plexus(api_key=CANARY, source_id="rig-01", gateway_url="https://example.invalid",
                verify_tls=False)
    px.close(timeout=0)
    assert any("TLS" in r.getMessage() for r in caplog.records)


# --- file permissions ------------------------------------------------------------------------


def test_key_files_readable_by_others_draw_a_warning(tmp_path, isolated_home, caplog):
    caplog.set_level(logging.WARNING)
    user_config = isolated_home / ".plexus" / "config.json"
    user_config.parent.mkdir(parents=True)
    user_config.write_text(json.dumps({"api_key": CANARY, "source_id": "rig-01"}))
    user_config.chmod(0o644)
    Plexus(gateway_url="http://127.0.0.1:9").close(timeout=0)
    assert any("readable by other users" in r.getMessage() for r in caplog.records), caplog.text

    rig = tmp_path / "rig.yaml"
    rig.write_text(f"api_key: {CANARY}\nsource_id: rig-01\nadapters:\n  - type: callable\n"
                   "    function: time:time\n    metric: t\n")
    rig.chmod(0o644)
    result = subprocess.run([*GATEWAY, "--config", str(rig), "--check"], capture_output=True,
                            text=True, timeout=60, env=child_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "readable by other users" in result.stderr
    assert_no_canary("the warning", result.stderr + caplog.text)


def test_files_the_project_creates_are_private(plexus_receiver, tmp_path, isolated_home):
    old = os.umask(0)  # the most permissive umask: modes must come from the code itself
    try:
        buffer_dir = tmp_path / "buffer"
        px = Plexus(api_key="plx_test", gateway_url=plexus_receiver.url, persistent_buffer=True,
                    buffer_path=buffer_dir / "b.db", flush_interval=0.05, sync_interval=0.02)
        for i in range(100):
            px.send("seq", i)
        px.flush_buffer(timeout=10)
        created_while_open = {f: stat.S_IMODE(f.stat().st_mode) for f in files_under(buffer_dir)}
        px.close()

        from plexus.sinks.file import FileSink, FileSinkOptions

        out = tmp_path / "out" / "points.jsonl"
        sink = FileSink(FileSinkOptions(path=str(out), max_bytes=300, backups=2))
        sink.open("rig-01")
        for i in range(10):
            sink.send([("seq", i, 1700000000000, None)], "k")
        sink.close()
    finally:
        os.umask(old)
    config_json = isolated_home / ".plexus" / "config.json"
    assert config_json.exists()  # the generated source_id was saved
    modes = {**created_while_open,
             **{f: stat.S_IMODE(f.stat().st_mode) for f in files_under(isolated_home, out.parent)}}
    names = {f.name for f in modes}
    assert {"config.json", "b.db", "b.db-wal", "points.jsonl", "points.jsonl.1"} <= names, names
    assert any(name.startswith("b.db.inbox.") for name in names), names
    loose = {str(f): oct(m) for f, m in modes.items() if m & 0o077}
    assert not loose, f"readable by others: {loose}"
