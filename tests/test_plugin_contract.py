"""What a plugin author relies on (issue 15): the sink contract under failure, a sink
entry's tags, limits checked at load, two packages registering one type name, the
adapter's reconnect rule, the public names and the testing API."""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

import plexus
from plexus import (
    Adapter,
    InvalidOptions,
    SendResult,
    Sink,
    ThreadedAdapter,
    hookimpl,
)
from plexus.config import ConfigErrors, describe_options, load_config_text
from plexus.plugins import load_plugins
from plexus.testing import check_rig, run_gateway
from tests.support import readings

REPO = Path(__file__).resolve().parent.parent
FUNCS = Path(__file__).with_name("gateway_funcs.py")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus.cli", *args], capture_output=True,
                          text=True, timeout=90, env={**os.environ, **(env or {})},
                          cwd=cwd or REPO)


def plugin_module(name: str, *, adapters: tuple[type, ...] = (), sinks: tuple[type, ...] = (),
                  ) -> types.ModuleType:
    module = types.ModuleType(name)
    if adapters:
        @hookimpl
        def plexus_register_adapters(register: Any) -> None:
            for cls in adapters:
                register(cls)
        module.plexus_register_adapters = plexus_register_adapters  # type: ignore[attr-defined]
    if sinks:
        @hookimpl
        def plexus_register_sinks(register: Any) -> None:
            for cls in sinks:
                register(cls)
        module.plexus_register_sinks = plexus_register_sinks  # type: ignore[attr-defined]
    return module


# --- A: a sink entry's tags ----------------------------------------------------------------


def test_a_sink_entrys_tags_reach_that_sinks_points_only(plexus_receiver, tmp_path):
    with run_gateway(f"""
        tags: {{site: depot}}
        adapters:
          - type: callable
            function: {FUNCS}:number
            metric: x
            interval: 0.02
            tags: {{bus: main, copy: adapter}}
        sinks:
          - type: plexus
          - type: file
            path: out.jsonl
            tags: {{copy: backup, dest: disk}}
    """, receiver=plexus_receiver, folder=tmp_path) as gateway:
        assert gateway.wait_until(lambda: gateway.sink("file")["delivered"] >= 5)
    lines = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    # Added where a point has no such tag: the point's own, the adapter's and the
    # gateway's tags win (as an adapter's tags give way to a point's).
    assert all(line["tags"] == {"site": "depot", "bus": "main", "copy": "adapter",
                                "dest": "disk"} for line in lines)
    assert plexus_receiver.points[0]["tags"] == {"site": "depot", "bus": "main",
                                                 "copy": "adapter"}


def test_a_sink_entrys_tags_are_checked_like_any_tags(tmp_path):
    problems = check_rig("""
        adapters: [{type: callable, function: "time:time", metric: t}]
        sinks:
          - type: stdout
            tags: {rev: 3}
    """, folder=tmp_path)
    assert problems == [f"{tmp_path / 'rig.yaml'}:4: sinks[0].tags.rev: expected a string, "
                        "got 3 (quote it to make it a string)"]


# --- B: a sink that cannot open ------------------------------------------------------------


class FlakyOpenSink(Sink):
    """Fails to open until the file ``gate`` exists; counts opens and closes."""

    type_name = "flaky_open"

    @dataclass
    class Options:
        gate: str = field(metadata={"help": "opens once this file exists", "path": True})

    opens = 0
    closes = 0
    sent: list[str] = []

    def open(self, source_id: str) -> None:
        FlakyOpenSink.opens += 1
        if not os.path.exists(self.options.gate):
            raise OSError(f"{self.options.gate} is not there yet")

    def send(self, points: list[Any], key: str) -> SendResult:
        FlakyOpenSink.sent.extend(p[0] for p in points)
        return SendResult(len(points))

    def close(self) -> None:
        FlakyOpenSink.closes += 1


def test_a_sink_that_cannot_open_is_isolated_retried_and_then_delivers(plexus_receiver,
                                                                       tmp_path, caplog):
    FlakyOpenSink.opens = FlakyOpenSink.closes = 0
    FlakyOpenSink.sent = []
    caplog.set_level(logging.INFO, logger="plexus.sinks")
    with run_gateway(f"""
        adapters:
          - type: callable
            function: {FUNCS}:number
            metric: x
            interval: 0.02
        sinks:
          - type: plexus
          - type: flaky_open
            gate: gate.txt
    """, receiver=plexus_receiver, folder=tmp_path,
            plugins={"flaky": plugin_module("flaky", sinks=(FlakyOpenSink,))}) as gateway:
        # The other sink keeps delivering while this one cannot open.
        assert gateway.wait_until(lambda: plexus_receiver.count >= 20)
        status = gateway.sink("flaky_open")
        assert status["state"] == "opening" and status["delivered"] == 0
        assert re.fullmatch(r"cannot open: OSError: .*gate.txt is not there yet; next attempt "
                            r"in \d+ s", status["last_error"])
        assert status["buffered"] > 0  # its points wait in its own buffer
        (tmp_path / "gate.txt").write_text("")
        assert gateway.wait_until(lambda: gateway.sink("flaky_open")["state"] == "open",
                                  timeout=15)
        assert gateway.wait_until(lambda: len(FlakyOpenSink.sent) >= 20)
    assert FlakyOpenSink.opens >= 2 and FlakyOpenSink.closes == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "plexus.sinks"]
    assert re.search(r"sink flaky_open could not open: OSError: .*; the other sinks keep "
                     r"delivering, its points are buffered, next attempt in \d+\.\d s",
                     messages[0])
    assert any("sink flaky_open is open (attempt" in m for m in messages)


def test_close_is_not_called_on_a_sink_that_never_opened(plexus_receiver, tmp_path):
    FlakyOpenSink.opens = FlakyOpenSink.closes = 0
    with run_gateway(f"""
        adapters: [{{type: callable, function: "{FUNCS}:number", metric: x}}]
        sinks: [{{type: flaky_open, gate: never.txt}}]
    """, receiver=plexus_receiver, folder=tmp_path,
            plugins={"flaky": plugin_module("flaky", sinks=(FlakyOpenSink,))}) as gateway:
        assert gateway.sink("flaky_open")["state"] == "opening"
    assert FlakyOpenSink.opens >= 1 and FlakyOpenSink.closes == 0


def test_the_issue_rig_runs_the_other_sink_and_check_finds_the_path(plexus_receiver, tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "batch: {interval: 0.05}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                   "    metric: x\n    interval: 0.05\n"
                   "sinks:\n  - type: plexus\n  - type: file\n    path: /proc/nope/x.jsonl\n")
    check = cli("--config", str(rig), "--check")
    assert check.returncode == 78
    assert (f"{rig}:12: sinks[1] (file): cannot create /proc/nope/x.jsonl: /proc does not "
            "take new files") in check.stderr
    run = cli("--config", str(rig), "--duration", "2", "--no-status")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "sink file could not open: FileNotFoundError" in run.stderr
    assert plexus_receiver.count > 0


def test_check_finds_a_folder_the_gateway_may_not_write():
    # The service runs as its own user (the unit's DynamicUser). Root writes anywhere
    # the mode bits forbid, so as root the check runs in a child process as nobody.
    base = Path(tempfile.mkdtemp(prefix="plexus-locked-"))  # in /tmp: any user reaches it
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o500)
        rig = f"""
            adapters: [{{type: callable, function: "time:time", metric: t}}]
            sinks: [{{type: file, path: {locked}/sub/x.jsonl}}]
        """
        problems = _unprivileged(lambda: check_rig(rig, folder=base))
    finally:
        shutil.rmtree(base)
    assert any("locked does not take new files (Permission denied)" in p for p in problems), \
        problems


def _unprivileged(task: Any) -> Any:
    """``task()``'s JSON-able result, computed as user nobody when we are root."""
    if os.geteuid() != 0:
        return task()
    task()  # once as root first: nobody cannot read root's Python to import lazily
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root for good, run the task, report, exit
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload = orjson.dumps({"result": task()})
        except BaseException as exc:  # reported to the parent, never raised here
            payload = orjson.dumps({"error": repr(exc)})
        os.write(write_end, payload)
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        data = b"".join(iter(lambda: os.read(read_end, 65536), b"")) if ready else b""
    finally:
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data, "the unprivileged check did not answer within 60 s"
    answer = orjson.loads(data)
    assert "error" not in answer, answer["error"]
    return answer["result"]


def test_check_writes_nothing_when_probing(tmp_path):
    problems = check_rig("""
        adapters: [{type: callable, function: "time:time", metric: t}]
        sinks: [{type: file, path: deep/er/x.jsonl}]
    """, folder=tmp_path)
    assert problems == [] and list(tmp_path.iterdir()) == []


# --- C: limits, checked at load, all at once, with lines ------------------------------------


def test_every_limit_of_the_issue_is_reported_at_once_with_its_line(tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(textwrap.dedent("""\
        source_id: rig-01
        adapters:
          - type: callable
            function: "math:pi"
            interval: -1
            metric: 5
          - type: serial
            port: /dev/null
            bytesize: 9
            stopbits: 3
          - type: mavlink
            connection: udpin:0.0.0.0:14550
            source_system: 999
        sinks:
          - type: plexus
            gzip_level: 42
            timeout: 0
    """))
    result = cli("--config", str(rig), "--check")
    assert result.returncode == 78
    assert result.stderr.splitlines()[1:] == [
        f"  {rig}:5: adapters[0].interval: must be greater than 0, got -1.0",
        f"  {rig}:6: adapters[0].metric: expected a string or null, got 5 (quote it to make "
        "it a string)",
        f"  {rig}:9: adapters[1].bytesize: expected one of 5, 6, 7, 8, got 9",
        f"  {rig}:10: adapters[1].stopbits: expected one of 1, 1.5, 2, got 3",
        f"  {rig}:13: adapters[2].source_system: must be between 1 and 255, got 999",
        f"  {rig}:16: sinks[0].gzip_level: must be between 1 and 9, got 42",
        f"  {rig}:17: sinks[0].timeout: must be greater than 0, got 0.0",
    ]


def test_cross_field_rules_report_every_problem_at_its_key(tmp_path):
    problems = check_rig("""
        adapters:
          - type: mqtt
            topics: ["a/#/b"]
            share_group: "a/b"
            password: secret
    """, folder=tmp_path)
    rig = tmp_path / "rig.yaml"
    assert problems == [
        f"{rig}:3: adapters[0].topics[0]: 'a/#/b': '#' must be a whole level and the last one",
        f"{rig}:4: adapters[0].share_group: needs protocol: '5' (MQTT 5 shared subscriptions)",
        f"{rig}:4: adapters[0].share_group: must be a non-empty name without '/', '+' or '#', "
        "got 'a/b'",
        f"{rig}:5: adapters[0].password: is set without a username",
    ]


def test_options_built_in_python_are_held_to_the_same_limits():
    from plexus.adapters.serial import SerialOptions
    from plexus.sinks.http import HttpSinkOptions

    with pytest.raises(InvalidOptions) as info:
        SerialOptions(port="/dev/ttyUSB0", bytesize=9, stopbits=3)  # type: ignore[arg-type]
    assert info.value.problems == [("bytesize", "expected one of 5, 6, 7, 8, got 9"),
                                   ("stopbits", "expected one of 1, 1.5, 2, got 3")]
    with pytest.raises(InvalidOptions, match="gzip_level: must be between 1 and 9, got 0"):
        HttpSinkOptions(gzip_level=0)


def test_every_number_option_of_the_built_ins_declares_its_limits():
    """A number option without a limit is a decision: it must be listed here, with why."""
    from typing import get_args

    from plexus.config import GatewaySettings
    from plexus.config.options import field_specs
    from plexus.config.problems import is_options_class, is_union, strip_annotated

    unbounded = {"can.channel": "an interface's channel: a name or an index"}
    found = []

    def walk(cls: type, prefix: str) -> None:
        for name, spec in field_specs(cls).items():
            tp = strip_annotated(spec.annotation)
            if is_options_class(tp):
                walk(tp, f"{prefix}{name}.")
                continue
            members = [strip_annotated(m) for m in get_args(tp)] if is_union(tp) else [tp]
            if any(m in (int, float) for m in members) and not spec.limits:
                found.append(prefix + name)

    walk(GatewaySettings, "")
    registry = load_plugins()
    for kind in (registry.adapters, registry.sinks):
        for name, cls in kind.items():
            if registry.providers[("adapter" if kind is registry.adapters else "sink",
                                   name)].package == "plexus-gateway":
                walk(cls.Options, f"{name}.")
    assert sorted(found) == sorted(unbounded)


def test_options_show_limits_and_defaults_as_written():
    from plexus import OptionsModel, option

    class Bme280Options(OptionsModel):
        address: int = option(0x76, help="I2C address", ge=0x76, le=0x77)
        bus: int = option(1, help="I2C bus number", ge=0)
        settle: float = option(0.0025, help="seconds", gt=0)

    @dataclass
    class Legacy:
        mask: int = field(default=0x7FF, metadata={"help": "id mask", "ge": 0, "le": 0x1FFF_FFFF})
        size: int = field(default=10_000_000, metadata={"help": "bytes"})

    assert describe_options(Bme280Options) == [
        ("address", "integer, >= 0x76, <= 0x77", "0x76", "I2C address"),
        ("bus", "integer, >= 0", "1", "I2C bus number"),
        ("settle", "number, > 0", "0.0025", "seconds"),
    ]
    assert describe_options(Legacy) == [
        ("mask", "integer, >= 0, <= 0x1FFF_FFFF", "0x7FF", "id mask"),
        ("size", "integer", "10_000_000", "bytes"),
    ]

    class Sensor(Adapter):
        type_name = "sensor"
        Options = Bme280Options

    registry = load_plugins(extra={"sensor": plugin_module("sensor", adapters=(Sensor,))})
    with pytest.raises(ConfigErrors) as info:
        load_config_text("adapters:\n  - type: sensor\n    address: 0x75\n",
                         adapter_types=registry.adapters, sink_types=registry.sinks)
    assert str(info.value) == ("<string>:3: adapters[0].address: must be between 0x76 and "
                               "0x77, got 117")


# --- D: two packages, one type name --------------------------------------------------------


def fake_distribution(root: Path, package: str, module: str, type_name: str,
                      kind: str = "adapter") -> None:
    """An installed distribution as pip leaves one: a module and its dist-info."""
    hook = "plexus_register_adapters" if kind == "adapter" else "plexus_register_sinks"
    base = "ThreadedAdapter" if kind == "adapter" else "Sink"
    (root / f"{module}.py").write_text(textwrap.dedent(f"""\
        from dataclasses import dataclass, field
        from plexus import {base}, SendResult, hookimpl

        @dataclass
        class Options:
            note: str = field(default="{package}", metadata={{"help": "who I am"}})

        class Impl({base}):
            type_name = "{type_name}"
            Options = Options

            def connect(self):
                pass

            def run_connected(self):
                self.emit("from.{module}", 1)
                self.stopping.wait(60)

            def send(self, points, key):
                return SendResult(len(points))

        @hookimpl
        def {hook}(register):
            register(Impl)
    """))
    info = root / f"{package.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[plexus]\n{module} = {module}\n")


@pytest.fixture
def two_bme280_packages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "plexus-bme280", "bme280_real", "bme280")
    fake_distribution(site, "plexus-bme280sim", "bme280_sim", "bme280")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return site, env


def test_a_type_two_packages_register_is_refused_naming_both(two_bme280_packages, tmp_path):
    _site, env = two_bme280_packages
    rig = tmp_path / "rig.yaml"
    rig.write_text("source_id: rig-01\napi_key: plx_x\nadapters:\n  - type: bme280\n")
    for args in (("--check",), ("--duration", "1")):
        result = cli("--config", str(rig), *args, env=env)
        assert result.returncode == 78, result.stderr
        assert (f"{rig}:4: adapters[0].type: adapter type 'bme280' is registered by two "
                "packages, plexus-bme280 and plexus-bme280sim; write 'type: "
                "bme280@plexus-bme280' or 'type: bme280@plexus-bme280sim' to choose (or "
                "uninstall one)") in result.stderr, result.stderr


def test_the_rig_chooses_a_package_with_type_at_package(two_bme280_packages, tmp_path,
                                                       plexus_receiver):
    _site, env = two_bme280_packages
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "batch: {interval: 0.05}\n"
                   "adapters:\n  - type: bme280@plexus-bme280sim\n    note: chosen\n")
    check = cli("--config", str(rig), "--check", env=env)
    assert check.returncode == 0, check.stderr
    assert "adapter bme280 (type bme280)" in check.stdout  # named by the bare type
    assert "note: adapter type 'bme280' is registered by two packages" in check.stdout
    run = cli("--config", str(rig), "--duration", "1.5", "--no-status", env=env)
    assert run.returncode == 0, run.stderr
    assert {p["metric"] for p in readings(plexus_receiver)} == {"from.bme280_sim"}
    listing = cli("plugins", env=env)
    rows = [line.split() for line in listing.stdout.splitlines() if " bme280 " in line]
    assert rows == [["adapter", "bme280", "plexus-bme280", "1.0"],
                    ["adapter", "bme280", "plexus-bme280sim", "1.0"]]
    options = cli("options", "bme280", env=env)
    assert "## adapter `bme280@plexus-bme280` (plexus-bme280)" in options.stdout
    assert "## adapter `bme280@plexus-bme280sim` (plexus-bme280sim)" in options.stdout


def test_a_plugin_replaces_a_built_in_only_where_the_rig_asks(tmp_path, plexus_receiver):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "plexus-fancyfile", "fancyfile", "file", kind="sink")
    env = {"PYTHONPATH": str(site)}
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                   "    metric: x\nsinks:\n  - type: file\n    path: out.jsonl\n")
    check = cli("--config", str(rig), "--check", env=env)
    assert check.returncode == 0, check.stderr  # the built-in, as before
    assert ("note: sink type 'file' is built in and also registered by plexus-fancyfile: "
            "'type: file' stays the built-in; write 'type: file@plexus-fancyfile' to use the "
            "plugin's") in check.stdout
    rig.write_text(rig.read_text().replace("type: file\n    path: out.jsonl",
                                           "type: file@plexus-fancyfile"))
    check = cli("--config", str(rig), "--check", env=env)
    assert check.returncode == 0, check.stderr
    schema = cli("schema", env=env)
    titles = [item["title"] for item in
              orjson.loads(schema.stdout)["properties"]["sinks"]["items"]["anyOf"]]
    assert {"file", "file@plexus-gateway", "file@plexus-fancyfile"} <= set(titles)


def test_a_wrong_package_after_the_at_is_named():
    class Bme(ThreadedAdapter):
        type_name = "bme280"

        @dataclass
        class Options:
            pass

    registry = load_plugins(extra={"a": plugin_module("pkg_a", adapters=(Bme,))})
    with pytest.raises(ConfigErrors) as info:
        load_config_text("adapters:\n  - type: bme280@pkg-b\n", adapter_types=registry.adapters,
                         sink_types=registry.sinks)
    assert str(info.value) == ("<string>:2: adapters[0].type: no installed package 'pkg-b' "
                               "registers adapter type 'bme280' (it comes from pkg_a)")
    assert registry.adapters["bme280@PKG.A"] is Bme  # package names compare as pip does


# --- the adapter's reconnect rule ----------------------------------------------------------


class Flaky(ThreadedAdapter):
    """Emits ``per_link`` points, then loses its link; or fails to connect ``failures`` times."""

    type_name = "flaky"
    reconnect_initial = 0.05
    reconnect_max = 0.4

    @dataclass
    class Options:
        per_link: int = 0
        failures: int = 0

    def __init__(self, options: Any, name: str | None = None) -> None:
        super().__init__(options, name)
        self.connects = 0
        self.delays: list[float] = []

    def connect(self) -> None:
        self.connects += 1
        if self.connects <= self.options.failures:
            raise OSError("no device")

    def run_connected(self) -> None:
        for _ in range(self.options.per_link):
            self.emit("x", 1.0)
        raise OSError("read error")


class RecordingContext:
    def __init__(self) -> None:
        self.points: list[Any] = []

    def emit(self, metric: str, value: Any, timestamp: Any = None, tags: Any = None) -> None:
        self.points.append(metric)

    def begin_session(self, *args: Any) -> None: ...

    def end_session(self, *args: Any) -> None: ...


def delays_logged(caplog: Any, name: str) -> list[float]:
    out = []
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith(f"{name}: "):
            match = re.search(r"next attempt in ([\d.]+) s$", message)
            out.append(float(match.group(1)) if match else 0.0)
    return out


def run_flaky(caplog: Any, options: Any, until: Any) -> Flaky:
    adapter = Flaky(options, name="flaky")
    adapter._reconnect_log = lambda level, msg, *args: logging.getLogger("t").log(  # noqa: SLF001
        level, msg, *args)  # every line, not rate-limited, for the test
    caplog.set_level(logging.INFO, logger="t")
    adapter.start(RecordingContext())  # type: ignore[arg-type]
    deadline = time.monotonic() + 20
    while not until(adapter) and time.monotonic() < deadline:
        time.sleep(0.01)
    adapter.stop(2)
    return adapter


def test_a_link_that_never_works_backs_off_and_says_when_it_tries_next(caplog):
    run_flaky(caplog, Flaky.Options(failures=100), lambda a: a.connects >= 6)
    delays = delays_logged(caplog, "flaky")[:5]
    # 0.05 doubling, capped at 0.4, each +-25%
    for delay, nominal in zip(delays, [0.05, 0.1, 0.2, 0.4, 0.4], strict=True):
        assert nominal * 0.75 - 0.05 <= delay <= nominal * 1.25 + 0.05, delays
    assert all("cannot connect: OSError: no device" in r.getMessage()
               for r in caplog.records if r.name == "t")


def test_a_link_that_delivered_reconnects_at_once_instead_of_backing_off(caplog):
    adapter = run_flaky(caplog, Flaky.Options(per_link=50), lambda a: a.connects >= 8)
    assert adapter.points >= 50 * 7
    # Every link delivered, so the backoff never grows past the first step.
    assert max(delays_logged(caplog, "flaky")) <= Flaky.reconnect_initial
    assert all("read error" in r.getMessage() for r in caplog.records if r.name == "t")


# --- the public names and the testing API --------------------------------------------------


def test_a_plugin_imports_everything_from_plexus():
    for name in ("Adapter", "ThreadedAdapter", "AdapterContext", "Sink", "SendResult", "Batch",
                 "PointCodec", "Point", "OptionsModel", "option", "InvalidOptions", "require",
                 "declared_problems", "cannot_write", "hookimpl", "RetryableSinkError",
                 "AuthenticationError", "SinkError", "AdapterError", "ConfigError"):
        assert name in plexus.__all__ and getattr(plexus, name) is not None
    assert plexus.__all__ == sorted(plexus.__all__)


def test_run_gateway_reports_an_invalid_rig_with_the_tests_own_lines(tmp_path):
    with pytest.raises(ConfigErrors) as info:
        run_gateway("""
            adapters:
              - type: callable
                function: "math:pi"
                intervall: 1
        """, folder=tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'rig.yaml'}:4: adapters[0].intervall: "
                                      "unknown key")


def test_the_plexus_gateway_fixture_runs_a_rig_and_stops_it(plexus_gateway, plexus_receiver):
    gateway = plexus_gateway(f"""
        adapters:
          - type: callable
            name: engine
            function: {FUNCS}:number
            metric: rpm
            interval: 0.02
    """)
    assert gateway.wait_until(lambda: plexus_receiver.count >= 5)
    assert gateway.adapter("engine")["state"] == "connected"
    assert gateway.status()["source_id"] == "test-rig"
    with pytest.raises(KeyError, match="no sink named 'nope' \\(the rig has: plexus\\)"):
        gateway.sink("nope")


# --- a plugin's own codec survives a crash of the persistent buffer -------------------------


CODEC_SCRIPT = """
import os, sys
from plexus import PointCodec
from plexus.codec import register_codec
from plexus.sqlite_buffer import SqliteBuffer

class CsvCodec(PointCodec):
    tag = "csv-lines"
    def record(self, p): return f"{p[0]},{p[1]},{p[2]}".encode()
    def block(self, records): return b"\\n".join(records)
    def body(self, raw): return raw
    def points(self, raw):
        return [(m, float(v), int(t), None)
                for m, v, t in (line.split(",") for line in raw.decode().splitlines())]

register_codec(CsvCodec())  # what the gateway does before it opens a sink's buffer
buffer = SqliteBuffer(sys.argv[1], 1000)
buffer.set_codec(CsvCodec())
if sys.argv[2] == "write":
    for i in range(10):
        buffer.put(("m", float(i), 1000 + i, None))
    os._exit(0)  # killed: nothing closed, the records are only in the inbox
batch = buffer.take(100)
print(len(buffer), [p[1] for p in batch.points])
buffer.close()
"""


def test_a_plugin_codecs_records_are_recovered_after_a_crash(tmp_path):
    script = tmp_path / "codec.py"
    script.write_text(CODEC_SCRIPT)
    db = tmp_path / "buffer.db"
    subprocess.run([sys.executable, str(script), str(db), "write"], check=True, timeout=60)
    out = subprocess.run([sys.executable, str(script), str(db), "read"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.split(" ", 1) == ["10", f"{[float(i) for i in range(10)]}\n"]


def test_import_plexus_stays_light():
    code = ("import sys, plexus; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pydantic', 'annotated_types', 'yaml'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_sink_opener_stops_cleanly_while_an_open_hangs():
    from plexus.sink_opener import SinkOpener

    release = threading.Event()

    class Slow(Sink):
        type_name = "slow"
        calls = 0

        def open(self, source_id: str) -> None:
            Slow.calls += 1
            if Slow.calls == 1:
                raise OSError("first")
            release.wait(5)

    opener = SinkOpener(Slow(None), "rig", lambda: None, initial=0.01)
    assert opener.start() is False
    time.sleep(0.2)  # the retry is under way, blocked in open()
    release.set()
    opener.stop(2)
    assert opener.state in ("open", "stopped")


def test_a_sink_entrys_tags_never_push_a_point_over_the_tag_limit():
    from plexus.buffer import MemoryBuffer
    from plexus.pipeline import Pipeline
    from plexus.sinks.stdout import StdoutSink

    pipeline = Pipeline("rig-01")
    plain, tagged = MemoryBuffer(100), MemoryBuffer(100)
    pipeline.add_lane(StdoutSink(name="a"), plain)
    pipeline.add_lane(StdoutSink(name="b"), tagged, tags={"dest": "b"})
    full = {f"t{i}": "v" for i in range(16)}
    pipeline.emit("x", 1.0, tags=full)
    pipeline.emit("y", 2.0)
    pipeline.emit("z", 3.0, tags={"dest": "own"})
    taken = tagged.take(10)
    assert taken is not None
    assert [p[3] for p in taken.points] == [full, {"dest": "b"}, {"dest": "own"}]
    assert len(plain) == 3


def test_a_plugins_pydantic_options_are_as_strict_as_the_built_ins():
    from pydantic import model_validator

    from plexus import OptionsModel, option

    class Inner(OptionsModel):
        level: int = option(1, help="a level", ge=0)

    class StrictOptions(OptionsModel):
        port: int = option(1883, help="a port", ge=1, le=65535)
        tls: bool = option(False, help="use TLS")
        inner: Inner = option(default_factory=Inner, help="nested")

        @model_validator(mode="after")
        def _tls_port(self) -> StrictOptions:
            if self.tls and self.port == 1883:
                raise InvalidOptions([("port", "1883 is the plain port; TLS uses 8883")])
            return self

    class Strict(Adapter):
        type_name = "strict"
        Options = StrictOptions

    registry = load_plugins(extra={"strict": plugin_module("strict", adapters=(Strict,))})

    def problems(text: str) -> list[str]:
        try:
            load_config_text(text, adapter_types=registry.adapters, sink_types=registry.sinks)
        except ConfigErrors as exc:
            return [str(p) for p in exc.errors]
        return []

    assert problems('adapters:\n  - type: strict\n    port: "1883"\n    tls: 1\n'
                    '    inner: {level: "2", extra: 1}\n') == [
        "<string>:3: adapters[0].port: expected an integer, got '1883'",
        "<string>:4: adapters[0].tls: expected a boolean, got 1",
        "<string>:5: adapters[0].inner.level: expected an integer, got '2'",
        "<string>:5: adapters[0].inner.extra: unknown key; allowed keys: level",
    ]
    assert problems("adapters:\n  - type: strict\n    tls: true\n") == [
        "<string>:2: adapters[0].port: 1883 is the plain port; TLS uses 8883"]
    assert problems("adapters:\n  - type: strict\n    tls: true\n    port: 8883\n") == []


def test_a_legacy_check_is_reported_with_the_entrys_other_problems(tmp_path):
    problems = check_rig("""
        commands:
          enabled: true
          ws_url: http://nope
          stream_max_seconds: 0
        adapters: [{type: callable, function: "time:time", metric: t}]
    """, folder=tmp_path)
    rig = tmp_path / "rig.yaml"
    assert problems == [
        f"{rig}:3: commands.ws_url: must start with ws:// or wss://, got 'http://nope'",
        f"{rig}:4: commands.stream_max_seconds: must be greater than 0, got 0.0",
    ]
