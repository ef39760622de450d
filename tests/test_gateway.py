"""The gateway as a user runs it: rig files, the command, plugins, sinks, shutdown."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from plexus import hookimpl
from plexus.adapters.base import ThreadedAdapter
from plexus.config import load_config, load_config_text
from plexus.gateway import Gateway
from plexus.plugins import load_plugins
from tests.support import readings

FUNCS = Path(__file__).with_name("gateway_funcs.py")
REPO = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "plexus.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


def write(tmp_path: Path, text: str, name: str = "rig.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def rig(receiver_url: str, adapters: str, extra: str = "") -> str:
    return (f"source_id: rig-01\napi_key: plx_test\ngateway_url: {receiver_url}\n"
            f"batch:\n  interval: 0.05\n{extra}adapters:\n{adapters}")


# --- config errors through the command ----------------------------------------------------

CONFIG_ERRORS = [
    ("unknown key", "source_id: a\nadapters:\n  - type: callable\n    function: m:f\n    intervall: 1\n",
     ["rig.yaml:5", "adapters[0].intervall", "unknown key", "interval"]),
    ("wrong type", "adapters:\n  - type: callable\n    function: m:f\n    interval: fast\n",
     ["rig.yaml:4", "adapters[0].interval", "expected a number", "'fast'"]),
    ("missing option", "adapters:\n  - type: callable\n    interval: 1\n",
     ["rig.yaml:2", "adapters[0]", "missing required key 'function'"]),
    ("unknown type", "adapters:\n  - type: canbus\n",
     ["rig.yaml:2", "adapters[0].type", "unknown adapter type 'canbus'", "can", "mqtt"]),
    ("malformed yaml", "adapters: [\n  - type: x\n",
     ["rig.yaml", "invalid YAML"]),
    ("unset variable", "api_key: ${NOT_SET_ANYWHERE_123}\n",
     ["rig.yaml:1", "api_key", "NOT_SET_ANYWHERE_123"]),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_are_clear_messages_not_tracebacks(tmp_path, text, words):
    path = write(tmp_path, text)
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 78  # ExitCode.CONFIG
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_check_prints_a_summary(tmp_path, plexus_receiver):
    path = write(tmp_path, rig(plexus_receiver.url,
                               f"  - type: callable\n    name: seq\n    function: {FUNCS}:sequence\n"))
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert "adapter seq (type callable)" in result.stdout
    assert "sink plexus (type plexus)" in result.stdout
    assert plexus_receiver.count == 0  # --check starts nothing


# --- running ---------------------------------------------------------------------------------


def test_sigterm_delivers_buffered_points_and_exits_0(tmp_path, plexus_receiver):
    path = write(tmp_path, rig(
        plexus_receiver.url,
        f"  - type: callable\n    function: {FUNCS}:fast_sequence\n",
        extra="grace_period: 10\n",
    ).replace("interval: 0.05", "interval: 60\n  size: 1000000"))
    proc = subprocess.Popen([*GATEWAY, "--config", str(path), "--no-status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(2.0)
    assert plexus_receiver.count == 0  # everything is still buffered
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    values = sorted(p["value"] for p in readings(plexus_receiver))
    # How many the generator made in 2 s depends on the machine's load (85 were seen
    # on a busy 2-core box); what matters is that every one of them arrived.
    assert len(values) >= 10
    assert values == list(range(len(values)))  # nothing lost, nothing twice
    assert "buffered 0" in err


def test_duration_runs_then_shuts_down(tmp_path, plexus_receiver):
    path = write(tmp_path, rig(
        plexus_receiver.url,
        f"  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.05\n",
    ))
    result = run_cli("--config", str(path), "--duration", "1.5", "--no-status")
    assert result.returncode == 0, result.stderr
    values = sorted(p["value"] for p in readings(plexus_receiver))
    assert 10 <= len(values) and values == list(range(len(values)))


def test_dry_run_prints_instead_of_sending(tmp_path, plexus_receiver):
    path = write(tmp_path, rig(
        plexus_receiver.url,
        f"  - type: callable\n    function: {FUNCS}:number\n    metric: temp\n    interval: 0.1\n",
    ))
    result = run_cli("--config", str(path), "--duration", "0.6", "--dry-run", "--no-status")
    assert result.returncode == 0, result.stderr
    assert "temp=21.5" in result.stdout
    assert plexus_receiver.count == 0


def build(text: str, tmp_path: Path, registry=None, **kwargs) -> Gateway:
    registry = registry or load_plugins()
    config = load_config_text(text, str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    return Gateway(config, registry, **kwargs)


def _crash_plugin() -> types.ModuleType:
    from dataclasses import dataclass

    @dataclass
    class CrashOptions:
        where: str = "thread"

    class CrashAdapter(ThreadedAdapter):
        type_name = "crash"
        Options = CrashOptions

        def start(self, ctx):  # type: ignore[override]
            if self.options.where == "start":
                raise RuntimeError("cannot even start")
            super().start(ctx)

        def connect(self) -> None:
            pass

        def run_connected(self) -> None:
            raise RuntimeError("boom in the reader thread")

    module = types.ModuleType("crash_plugin")

    @hookimpl
    def plexus_register_adapters(register):
        register(CrashAdapter)

    module.plexus_register_adapters = plexus_register_adapters  # type: ignore[attr-defined]
    return module


def test_a_crashing_adapter_leaves_the_others_delivering(tmp_path, plexus_receiver):
    registry = load_plugins(extra={"crash": _crash_plugin()})
    gateway = build(rig(plexus_receiver.url,
                        "  - type: crash\n    name: bad-thread\n"
                        "  - type: crash\n    name: bad-start\n    where: start\n"
                        f"  - type: callable\n    name: good\n    function: {FUNCS}:pairs\n"
                        "    interval: 0.05\n"), tmp_path, registry)
    gateway.start()
    try:
        assert plexus_receiver.wait_for(20, timeout=10)
        status = {a["name"]: a for a in gateway.status()["adapters"]}
        assert status["bad-start"]["state"] == "failed"
        assert "cannot even start" in status["bad-start"]["last_error"]
        assert status["bad-thread"]["errors"] >= 1
        assert "boom" in status["bad-thread"]["last_error"]
        assert status["good"]["state"] == "connected"
    finally:
        gateway.shutdown(1.0)
    assert {"test.a", "test.b"} <= set(plexus_receiver.metrics())


def test_two_sinks_both_get_every_point_while_one_fails(tmp_path, plexus_receiver_factory):
    healthy, failing = plexus_receiver_factory(), plexus_receiver_factory()
    failing.go_down()
    gateway = build(
        "source_id: rig-01\napi_key: plx_test\nbatch:\n  interval: 0.05\n"
        "retry:\n  base: 0.05\n  max_delay: 0.2\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.01\n"
        f"sinks:\n  - type: plexus\n    name: up\n    gateway_url: {healthy.url}\n"
        f"  - type: plexus\n    name: down\n    gateway_url: {failing.url}\n",
        tmp_path,
    )
    gateway.start()
    try:
        assert healthy.wait_for(50, timeout=10)  # not stalled by the failing sink
        assert failing.count == 0
        failing.come_up()  # the failing receiver recovers
        time.sleep(0.5)
    finally:
        gateway.request_stop()
        adapters_stopped = [a.stop(2.0) for a, _ in gateway.adapters]
        assert adapters_stopped
        gateway.pipeline.flush(timeout=10)
        gateway.shutdown(5.0)
    up = sorted(p["value"] for p in healthy.points)
    down = sorted(p["value"] for p in failing.points)
    assert up == list(range(up[0], up[0] + len(up)))
    assert down == up


def test_file_and_stdout_sinks_get_the_same_points(tmp_path, capsys):
    out = tmp_path / "out" / "points.jsonl"
    gateway = build(
        "source_id: rig-01\nbatch:\n  interval: 0.05\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:pairs\n    interval: 0.05\n"
        "    tags:\n      unit: test\n"
        f"sinks:\n  - type: file\n    path: {out}\n  - type: stdout\n    format: json\n",
        tmp_path,
    )
    gateway.start()
    time.sleep(0.5)
    gateway.shutdown(5.0)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) >= 4 and lines == printed
    assert lines[0]["tags"] == {"unit": "test"} and lines[0]["source_id"] == "rig-01"


def test_file_sink_rotates_by_size(tmp_path):
    from plexus.sinks.file import FileSink, FileSinkOptions

    path = tmp_path / "p.jsonl"
    sink = FileSink(FileSinkOptions(path=str(path), max_bytes=2000, backups=2))
    sink.open("rig-01")
    for batch in range(10):
        sink.send([("m", i, 1700000000000 + i, None) for i in range(10)], f"k{batch}")
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2000
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_session_for_the_whole_run(tmp_path, plexus_receiver):
    gateway = build(rig(plexus_receiver.url,
                        f"  - type: callable\n    function: {FUNCS}:pairs\n    interval: 0.05\n",
                        extra="session: run-42\nsession_tags:\n  driver: ada\n"
                              "tags:\n  vehicle: v1\n"), tmp_path)
    gateway.start()
    assert plexus_receiver.wait_for(2, timeout=10)
    gateway.shutdown(2.0)
    assert plexus_receiver.points[0]["tags"] == {"vehicle": "v1", "session_id": "run-42",
                                                 "driver": "ada"}


def test_persistent_buffer_survives_a_gateway_restart(tmp_path, plexus_receiver):
    plexus_receiver.go_down()
    text = rig(plexus_receiver.url,
               f"  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.01\n",
               extra=f"buffer:\n  type: sqlite\n  path: {tmp_path / 'buf.db'}\n")
    gateway = build(text, tmp_path)
    gateway.start()
    time.sleep(0.5)
    gateway.shutdown(0.2)
    kept = len(gateway.pipeline.lanes[0].buffer)
    assert kept > 10
    plexus_receiver.come_up()
    second = build(text.replace("interval: 0.01", "interval: 100"), tmp_path)
    second.start()
    assert plexus_receiver.wait_for(kept, timeout=10)
    second.shutdown(5.0)


def test_each_sink_keeps_its_own_backlog_when_the_sinks_are_reordered(
        tmp_path, plexus_receiver_factory):
    down, up = plexus_receiver_factory(), plexus_receiver_factory()
    down.go_down()

    def two_sinks(first: tuple[str, str], second: tuple[str, str], interval: str) -> str:
        sinks = "".join(f"  - type: plexus\n    name: {name}\n    gateway_url: {url}\n"
                        for name, url in (first, second))
        return (f"source_id: rig-01\napi_key: plx_test\nbatch:\n  interval: 0.05\n"
                f"buffer:\n  type: sqlite\n  path: {tmp_path / 'buf.db'}\n"
                f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n"
                f"    interval: {interval}\nsinks:\n{sinks}")

    first = build(two_sinks(("a", down.url), ("b", up.url), "0.01"), tmp_path)
    first.start()
    time.sleep(0.5)
    first.shutdown(2.0)
    kept = len(first.pipeline.lanes[0].buffer)
    assert kept > 10 and len(first.pipeline.lanes[1].buffer) == 0
    delivered_to_b = len(readings(up))

    down.come_up()
    second = build(two_sinks(("b", up.url), ("a", down.url), "100"), tmp_path)
    second.start()
    try:
        assert down.wait_for(kept, timeout=10)  # a's backlog reached a, not b
    finally:
        second.shutdown(5.0)
    # each got at most the one reading the second gateway took, and b none of a's backlog
    assert kept <= len(readings(down)) <= kept + 1
    assert len(readings(up)) <= delivered_to_b + 1
    assert [lane.buffer.path.name for lane in second.pipeline.lanes] == ["buf.b.db", "buf.db"]


def test_a_new_first_sink_leaves_the_old_first_sinks_file_alone(tmp_path, caplog):
    from plexus.sqlite_buffer import SqliteBuffer

    base = tmp_path / "buf.db"
    old = SqliteBuffer(base, 1000)
    old.claim("a")
    old.claim("b")  # the first claim stands
    old.close()
    with caplog.at_level(logging.WARNING, logger="plexus.gateway"):
        assert Gateway._lane_file(base, 0, "c") == tmp_path / "buf.c.db"
    assert f"buffer file {base} holds the points of sink a, not of c" in caplog.text
    assert Gateway._lane_file(base, 2, "a") == base
    (tmp_path / "new").mkdir()
    assert Gateway._lane_file(tmp_path / "new" / "buf.db", 0, "c") == tmp_path / "new" / "buf.db"


# --- the callable adapter ---------------------------------------------------------------------


def test_callable_counts_exceptions_and_keeps_polling(tmp_path, plexus_receiver):
    gateway = build(rig(plexus_receiver.url,
                        f"  - type: callable\n    name: flaky\n    function: {FUNCS}:sometimes_broken\n"
                        "    interval: 0.02\n"), tmp_path)
    gateway.start()
    try:
        assert plexus_receiver.wait_for(5, timeout=10)
        health = gateway.adapters[0][0].health()
        assert health.errors >= 4 and "odd call" in (health.last_error or "")
        assert health.state == "connected"
    finally:
        gateway.shutdown(2.0)


def test_callable_without_metric_for_a_scalar_is_counted(tmp_path, plexus_receiver):
    gateway = build(rig(plexus_receiver.url,
                        f"  - type: callable\n    function: {FUNCS}:number\n    interval: 0.02\n"),
                    tmp_path)
    gateway.start()
    time.sleep(0.3)
    gateway.shutdown(1.0)
    health = gateway.adapters[0][0].health()
    assert health.errors >= 2 and "metric" in (health.last_error or "")
    assert plexus_receiver.count == 0


def test_callable_function_that_cannot_be_imported_is_a_clear_error(tmp_path):
    from plexus.config import ConfigErrors

    with pytest.raises(ConfigErrors, match=r"rig.yaml:2: adapters\[0\] \(callable\): cannot load function "
                                           "'no_such_module:f': ModuleNotFoundError"):
        build("adapters:\n  - type: callable\n    function: no_such_module:f\n", tmp_path)


def test_poll_from_python(plexus_receiver):
    from plexus import Plexus

    readings = iter(range(1000))
    with Plexus(api_key="plx_test", source_id="rig-01", gateway_url=plexus_receiver.url,
                flush_interval=0.05) as px:
        poller = px.poll(lambda: next(readings), interval=0.01, metric="polled",
                         tags={"sensor": "x"})
        assert plexus_receiver.wait_for(5, timeout=10)
        assert poller.health().points >= 5
    point = plexus_receiver.points[0]
    assert point["metric"] == "polled" and point["tags"] == {"sensor": "x"}


# --- plugins ---------------------------------------------------------------------------------


def test_plugins_command_lists_types_with_package_and_version():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    from plexus import __version__

    for kind, name in [("adapter", "callable"), ("adapter", "can"), ("adapter", "mqtt"),
                       ("adapter", "mavlink"), ("adapter", "serial"), ("sink", "plexus"),
                       ("sink", "file"), ("sink", "stdout")]:
        line = next(ln for ln in result.stdout.splitlines() if ln.split()[:2] == [kind, name])
        assert f"plexus-gateway {__version__}" in " ".join(line.split())


def test_disabled_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv("PLEXUS_DISABLE_PLUGINS", "crash")
    registry = load_plugins(extra={"crash": _crash_plugin()})
    assert "crash" not in registry.adapters and registry.disabled == ["crash"]


def test_plugin_that_fails_to_import_is_reported_and_others_load():
    def failing_load() -> types.ModuleType:
        raise ImportError("No module named 'missing_dependency'")

    registry = load_plugins(extra={"broken": failing_load, "crash": _crash_plugin()})
    assert any("'broken'" in e and "missing_dependency" in e for e in registry.errors)
    assert "crash" in registry.adapters and "callable" in registry.adapters


def test_hookimpl_without_spec_is_rejected():
    module = types.ModuleType("typo_plugin")

    @hookimpl
    def plexus_register_adaptors(register):  # misspelled hook
        pass

    module.plexus_register_adaptors = plexus_register_adaptors  # type: ignore[attr-defined]
    registry = load_plugins(extra={"typo": module})
    assert any("typo" in e and "plexus_register_adaptors" in e for e in registry.errors)
    assert "callable" in registry.adapters


def test_duplicate_and_invalid_registrations_are_reported():
    module = types.ModuleType("dup_plugin")

    class NotAnAdapter:
        type_name = "x"

    from plexus.adapters.callable import CallableAdapter

    @hookimpl
    def plexus_register_adapters(register):
        register(CallableAdapter)
        register(NotAnAdapter)

    module.plexus_register_adapters = plexus_register_adapters  # type: ignore[attr-defined]
    registry = load_plugins(extra={"dup": module})
    # A plugin registering a built-in's name replaces it only where a rig asks for it.
    assert registry.adapters["callable"] is CallableAdapter
    assert registry.adapters["callable@plexus-gateway"] is CallableAdapter
    assert any("'callable' is built in and also registered by dup_plugin" in w
               and "'type: callable@dup_plugin'" in w for w in registry.warnings)
    assert any("not a subclass" in e for e in registry.errors)


def test_every_adapter_and_sink_type_documents_its_options():
    import dataclasses

    registry = load_plugins()
    for cls in [*registry.adapters.values(), *registry.sinks.values()]:
        for f in dataclasses.fields(cls.Options):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


# --- configs/ -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    registry = load_plugins()
    config = load_config(path, adapter_types=registry.adapters, sink_types=registry.sinks,
                         environ={"PLEXUS_API_KEY": "plx_x", "HOME": "/tmp"})
    assert config.adapters


def test_configuration_docs_match_the_code():
    from plexus.cli import options_markdown

    registry = load_plugins()
    builtin = sorted(name for (_kind, name), provider in registry.providers.items()
                     if provider.package == "plexus-gateway")
    docs = (REPO / "docs" / "configuration.md").read_text()
    generated = docs.split("<!-- generated -->", 1)[1].strip()
    assert generated == options_markdown(registry, builtin, top_level=True).strip(), (
        "docs/configuration.md is stale: regenerate its tables with plexus-gateway options")


def test_check_touches_no_buffer_file(tmp_path):
    buffer = tmp_path / "never.db"
    path = write(tmp_path, f"source_id: rig-01\napi_key: plx_k\nbuffer:\n  type: sqlite\n  path: {buffer}\n"
                           f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                           "    metric: m\n")
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert not buffer.exists()


def test_the_readme_demo_runs_and_shows_what_arrived():
    result = run_cli("--config", "configs/demo.yaml", "--duration", "3", "--no-status")
    assert result.returncode == 0, result.stderr
    assert "local receiver stored" in result.stdout
    for family in ("can.BATTERY_VT.*", "engine.*", "imu.*"):
        assert family in result.stdout
    assert "dropped 0, rejected 0" in result.stderr
