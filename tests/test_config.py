"""The rig file loader: what a user sees for good files and for every kind of mistake."""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from plexus.config import (
    BatchConfig,
    ComponentConfig,
    ConfigErrors,
    GatewaySettings,
    RigConfig,
    Where,
    build_options,
    describe_options,
    greater_than,
    load_config,
    load_config_text,
)
from plexus.errors import ConfigError, PlexusError

# ---------------------------------------------------------------------------
# Toy adapters and sinks whose options use every supported type


@dataclass
class Channel:
    id: int
    scale: float = 1.0


@dataclass
class Limits:
    low: float = 0.0
    high: float = 100.0


@dataclass
class ToyOptions:
    topic: str
    interval: float = field(default=1.0, metadata={"help": "seconds", "check": greater_than(0)})
    port: int = 1883
    enabled: bool = True
    topics: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)
    qos: Optional[int] = None  # noqa: UP045 -- Optional[] must keep working
    timeout: float | None = None
    mode: Literal["poll", "push"] = "poll"
    anything: Any = None
    limits: Limits = field(default_factory=Limits)
    channels: list[Channel] = field(default_factory=list)
    id: int | str = 0
    password: str | None = field(default=None, metadata={"secret": True})


class ToyAdapter:
    type_name = "toy"
    Options = ToyOptions


@dataclass
class PairOptions:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")


class PairAdapter:
    type_name = "pair"
    Options = PairOptions


@dataclass
class FileSinkOptions:
    path: str = "points.jsonl"


class FileSink:
    type_name = "file"
    Options = FileSinkOptions


ADAPTERS: dict[str, type] = {"toy": ToyAdapter, "pair": PairAdapter}
SINKS: dict[str, type] = {"file": FileSink}


def write(tmp_path: Path, text: str, name: str = "rig.yaml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    path.chmod(mode)
    return path


def load(path: Path, environ: dict[str, str] | None = None) -> RigConfig:
    return load_config(path, adapter_types=ADAPTERS, sink_types=SINKS, environ=environ or {})


def errors_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load(path, environ)
    assert str(info.value) == "\n".join(str(problem) for problem in info.value.errors)
    return str(info.value).splitlines()


def single_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    lines = errors_of(path, environ)
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------
# Good files


def test_full_file_loads_with_every_type(tmp_path: Path) -> None:
    path = write(tmp_path, """
        source_id: rover-7
        gateway_url: http://localhost:8080
        tags: {vehicle: rover-7}
        buffer: {type: sqlite, path: /tmp/b.db, max_points: 500, sync_interval: 2}
        batch: {size: 100, interval: 0.5, max_points: 5000}
        retry: {retries: 5, base: 0.5, max_delay: 10}
        session: run-1
        session_tags: {driver: ana}
        grace_period: 0
        log_level: DEBUG
        status_interval: 30
        verify_tls: false
        timeout: 3
        adapters:
          - type: toy
            name: telemetry
            tags: {bus: main}
            topic: rover/#
            interval: 2
            port: 1884
            enabled: false
            topics: [a, b]
            scales: {rpm: 2, temp: 0.5}
            qos: 1
            timeout: null
            mode: push
            anything: {free: [form]}
            limits: {high: 50}
            channels:
              - {id: 1}
              - {id: 2, scale: 0.1}
            id: rover
        sinks:
          - type: file
            path: out.jsonl
    """)
    config = load(path)

    assert config.path == str(path)
    assert config.source_id == "rover-7"
    assert config.tags == {"vehicle": "rover-7"}
    assert config.buffer.type == "sqlite" and config.buffer.max_points == 500
    assert config.buffer.sync_interval == 2.0 and isinstance(config.buffer.sync_interval, float)
    assert config.batch == BatchConfig(size=100, interval=0.5, max_points=5000)
    assert config.retry.retries == 5 and config.retry.max_delay == 10.0
    assert config.session == "run-1" and config.session_tags == {"driver": "ana"}
    assert config.grace_period == 0.0
    assert config.log_level == "debug"  # normalised
    assert config.verify_tls is False and config.timeout == 3.0

    (adapter,) = config.adapters
    assert isinstance(adapter, ComponentConfig)
    assert (adapter.type, adapter.name, adapter.tags, adapter.cls, adapter.line) == (
        "toy", "telemetry", {"bus": "main"}, ToyAdapter, 15)
    assert adapter.options == ToyOptions(
        topic="rover/#", interval=2.0, port=1884, enabled=False, topics=["a", "b"],
        scales={"rpm": 2.0, "temp": 0.5}, qos=1, timeout=None, mode="push",
        anything={"free": ["form"]}, limits=Limits(low=0.0, high=50.0),
        channels=[Channel(1), Channel(2, 0.1)], id="rover",
    )
    assert isinstance(adapter.options.interval, float)
    (sink,) = config.sinks
    assert (sink.type, sink.name, sink.options, sink.line) == (
        "file", "file", FileSinkOptions("out.jsonl"), 34)


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, """
        adapters:
          - type: toy
            topic: t
    """))
    assert config.source_id is None and config.api_key is None and config.gateway_url is None
    assert config.buffer.type == "memory" and config.buffer.path is None
    assert config.buffer.max_points is None and config.buffer.sync_interval == 1.0
    assert (config.batch.size, config.batch.interval, config.batch.max_points) == (1000, 1.0, 10000)
    assert (config.retry.retries, config.retry.base, config.retry.max_delay) == (3, 1.0, 30.0)
    assert config.grace_period == 5.0 and config.log_level == "info"
    assert config.status_interval == 10.0 and config.verify_tls is True
    assert config.timeout == 10.0 and config.tags == {} and config.session_tags == {}
    assert config.sinks == []  # the gateway picks its default sink
    assert config.adapters[0].options == ToyOptions(topic="t")


def test_names_default_to_type_then_numbered(tmp_path: Path) -> None:
    config = load(write(tmp_path, """
        adapters:
          - {type: toy, topic: a}
          - {type: toy, topic: b}
          - {type: toy, topic: c, name: toy-2}
          - {type: pair}
    """))
    # The explicit "toy-2" further down keeps its name; defaults step around it.
    assert [a.name for a in config.adapters] == ["toy", "toy-3", "toy-2", "pair"]


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    config = load(write(tmp_path, """
        tags: &common
          topic: shared
          port: "1"
        adapters:
          - <<: *common
            type: toy
            port: 2
    """))
    options = config.adapters[0].options
    assert (options.topic, options.port) == ("shared", 2)  # the key written here wins


# ---------------------------------------------------------------------------
# Every kind of error names file, line, key path and the expectation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    interval: fast\n",
            "rig.yaml:4: adapters[0].interval: expected a number, got 'fast'",
            id="float",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    port: 1883.5\n",
            "rig.yaml:4: adapters[0].port: expected an integer, got 1883.5",
            id="int",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    port: true\n",
            "rig.yaml:4: adapters[0].port: expected an integer, got true",
            id="bool-is-not-int",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    enabled: 1\n",
            "rig.yaml:4: adapters[0].enabled: expected a boolean, got 1",
            id="bool",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: [a]\n",
            "rig.yaml:3: adapters[0].topic: expected a string, got a list",
            id="str",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: 2024-05-01\n",
            "rig.yaml:3: adapters[0].topic: expected a string, got the date 2024-05-01 "
            "(quote it to make it a string)",
            id="str-hint",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    topics: a\n",
            "rig.yaml:4: adapters[0].topics: expected a list of strings, got 'a'",
            id="list",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    topics:\n      - a\n      - 7\n",
            "rig.yaml:6: adapters[0].topics[1]: expected a string, got 7 "
            "(quote it to make it a string)",
            id="list-item",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    scales: [1]\n",
            "rig.yaml:4: adapters[0].scales: expected a mapping of strings to numbers, got a list",
            id="dict",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    scales:\n      rpm: x\n",
            "rig.yaml:5: adapters[0].scales.rpm: expected a number, got 'x'",
            id="dict-value",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    scales: {1: 2.0}\n",
            "rig.yaml:4: adapters[0].scales.1: expected a string, got 1 "
            "(quote it to make it a string)",
            id="dict-key",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    qos: high\n",
            "rig.yaml:4: adapters[0].qos: expected an integer or null, got 'high'",
            id="optional",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    mode: pol\n",
            "rig.yaml:4: adapters[0].mode: expected one of 'poll', 'push', got 'pol' "
            "(did you mean 'poll'?)",
            id="literal",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    id: [1]\n",
            "rig.yaml:4: adapters[0].id: expected an integer or string, got a list",
            id="union",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    limits: 5\n",
            "rig.yaml:4: adapters[0].limits: expected a mapping, got 5",
            id="nested-dataclass",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    limits:\n      high: lots\n",
            "rig.yaml:5: adapters[0].limits.high: expected a number, got 'lots'",
            id="nested-field",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    channels:\n      - {id: 1}\n"
            "      - {scale: 2}\n",
            "rig.yaml:6: adapters[0].channels[1]: missing required key 'id'",
            id="list-of-dataclass",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n",
            "rig.yaml:2: adapters[0]: missing required key 'topic'",
            id="missing",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    intervall: 2\n",
            "rig.yaml:4: adapters[0].intervall: unknown key; allowed keys: anything, channels, "
            "enabled, id, interval, limits, mode, name, password, port, qos, scales, tags, "
            "timeout, topic, topics, type (did you mean 'interval'?)",
            id="unknown-option",
        ),
        pytest.param(
            "sourceid: x\n",
            "rig.yaml:1: sourceid: unknown key; allowed keys: adapters, agent_metrics, api_key, batch, "
            "buffer, clock, commands, gateway_url, grace_period, local_receiver, log_events, "
            "log_events_per_minute, log_level, metrics, retry, session, session_tags, sinks, "
            "source_id, status_interval, tags, timeout, verify_tls (did you mean 'source_id'?)",
            id="unknown-top-level",
        ),
        pytest.param(
            "adapters:\n  - type: toy\n    topic: t\n    interval: 0\n",
            "rig.yaml:4: adapters[0].interval: must be greater than 0, got 0.0",
            id="check",
        ),
        pytest.param(
            "adapters:\n  - {type: pair, low: 5, high: 1}\n",
            "rig.yaml:2: adapters[0]: low (5) must not exceed high (1)",
            id="post-init",
        ),
        pytest.param(
            "adapters:\n  - type: mqtt\n",
            "rig.yaml:2: adapters[0].type: unknown adapter type 'mqtt'; known types: pair, toy",
            id="unknown-adapter-type",
        ),
        pytest.param(
            "sinks:\n  - type: fil\n",
            "rig.yaml:2: sinks[0].type: unknown sink type 'fil'; known types: file "
            "(did you mean 'file'?)",
            id="unknown-sink-type",
        ),
        pytest.param(
            "adapters:\n  - topic: t\n",
            "rig.yaml:2: adapters[0]: missing required key 'type' (the adapter type: pair, toy)",
            id="missing-type",
        ),
        pytest.param(
            "adapters:\n  - toy\n",
            "rig.yaml:2: adapters[0]: expected a mapping with a 'type' key, got 'toy'",
            id="entry-not-mapping",
        ),
        pytest.param(
            "adapters:\n  type: toy\n",
            "rig.yaml:1: adapters: expected a list of adapters (each a mapping with a 'type' "
            "key), got a mapping",
            id="adapters-not-list",
        ),
        pytest.param(
            "adapters:\n  - {type: toy, topic: t, tags: {rev: 3}}\n",
            "rig.yaml:2: adapters[0].tags.rev: expected a string, got 3 "
            "(quote it to make it a string)",
            id="component-tags",
        ),
        pytest.param(
            "buffer:\n  type: disk\n",
            "rig.yaml:2: buffer.type: expected one of 'memory', 'sqlite', got 'disk'",
            id="buffer-type",
        ),
        pytest.param(
            "buffer:\n  max_points: 0\n",
            "rig.yaml:2: buffer.max_points: must be at least 1, got 0",
            id="buffer-max-points",
        ),
        pytest.param(
            "batch:\n  max_points: 20000\n",
            "rig.yaml:2: batch.max_points: must be between 1 and 10000, got 20000",
            id="batch-max-points",
        ),
        pytest.param(
            "batch: {size: 0}\n",
            "rig.yaml:1: batch.size: must be at least 1, got 0",
            id="batch-size",
        ),
        pytest.param(
            "batch:\n  interval: -1\n",
            "rig.yaml:2: batch.interval: must be greater than 0, got -1.0",
            id="batch-interval",
        ),
        pytest.param(
            "log_level: loud\n",
            "rig.yaml:1: log_level: must be one of debug, info, warning, error, critical, "
            "got 'loud'",
            id="log-level",
        ),
        pytest.param(
            "verify_tls: maybe\n",
            "rig.yaml:1: verify_tls: expected a boolean, got 'maybe'",
            id="top-level-bool",
        ),
        pytest.param(
            "tags:\n  a.b: x\n  a.b: y\n",
            "rig.yaml:3: tags['a.b']: duplicate key (first given on line 2)",
            id="duplicate-yaml-key",
        ),
        pytest.param(
            "tags: !!set {a, b}\n",
            "rig.yaml:1: tags: unsupported YAML tag 'tag:yaml.org,2002:set'",
            id="yaml-tag",
        ),
    ],
)
def test_error_names_file_line_path_and_expectation(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert errors_of(path) == [expected.replace("rig.yaml", str(path))]


def test_config_errors_are_config_errors_and_value_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "batch: {size: 0}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert isinstance(info.value, PlexusError) and isinstance(info.value, ValueError)
    (problem,) = info.value.errors  # type: ignore[attr-defined]
    assert (problem.file, problem.line, problem.path) == (str(path), 1, "batch.size")


def test_all_errors_in_a_file_are_reported_together_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, """
        batch:
          size: 0
        adapters:
          - type: nope
          - type: toy
            interval: fast
          - type: toy
            topic: t
            port: ${PORT}
        verify_tls: maybe
    """)
    assert errors_of(path) == [
        f"{path}:2: batch.size: must be at least 1, got 0",
        f"{path}:4: adapters[0].type: unknown adapter type 'nope'; known types: pair, toy",
        f"{path}:5: adapters[1]: missing required key 'topic'",
        f"{path}:6: adapters[1].interval: expected a number, got 'fast'",
        f"{path}:9: adapters[2].port: environment variable PORT is not set and has no default "
        "(write ${PORT:-default} to give one)",
        f"{path}:10: verify_tls: expected a boolean, got 'maybe'",
    ]


def test_duplicate_names_across_adapters_and_sinks(tmp_path: Path) -> None:
    path = write(tmp_path, """
        adapters:
          - {type: toy, topic: a, name: main}
          - {type: toy, topic: b, name: main}
        sinks:
          - {type: file, name: main}
          - {type: file, name: ""}
    """)
    assert errors_of(path) == [
        f"{path}:3: adapters[1].name: duplicate name 'main' (already used on line 2); "
        "names must be unique across adapters and sinks",
        f"{path}:5: sinks[0].name: duplicate name 'main' (already used on line 2); "
        "names must be unique across adapters and sinks",
        f"{path}:6: sinks[1].name: must not be empty",
    ]


# ---------------------------------------------------------------------------
# Interpolation


def toy_options(tmp_path: Path, body: str, environ: dict[str, str]) -> ToyOptions:
    text = "adapters:\n  - type: toy\n" + textwrap.indent(textwrap.dedent(body), "    ")
    options: ToyOptions = load(write(tmp_path, text), environ).adapters[0].options
    return options


def test_interpolates_set_variables_and_defaults(tmp_path: Path) -> None:
    options = toy_options(tmp_path, """
        topic: ${SITE}/telemetry/${SUFFIX:-all}
        topics: ["${SITE}", "x-${EMPTY:-fallback}"]
    """, {"SITE": "lab", "EMPTY": ""})
    assert options.topic == "lab/telemetry/all"
    assert options.topics == ["lab", "x-fallback"]  # ":-" covers empty, as in the shell


def test_unset_variable_without_default_names_the_variable(tmp_path: Path) -> None:
    line = single_error(tmp_path, """
        adapters:
          - type: toy
            topic: ${MQTT_TOPIC}
    """, {})
    assert line.endswith(":3: adapters[0].topic: environment variable MQTT_TOPIC is not set "
                         "and has no default (write ${MQTT_TOPIC:-default} to give one)")
    assert line.startswith(str(tmp_path / "rig.yaml"))


def test_set_but_empty_variable_without_default_is_empty(tmp_path: Path) -> None:
    assert toy_options(tmp_path, "topic: x${EMPTY}\n", {"EMPTY": ""}).topic == "x"


def test_double_dollar_escapes_a_literal_reference(tmp_path: Path) -> None:
    options = toy_options(tmp_path, "topic: cost $${NOT_A_VAR} and ${A}\n", {"A": "a"})
    assert options.topic == "cost ${NOT_A_VAR} and a"


def test_plain_whole_reference_is_retyped_by_yaml(tmp_path: Path) -> None:
    options = toy_options(tmp_path, """
        topic: t
        port: ${MQTT_PORT:-1883}
        interval: ${INTERVAL}
        enabled: ${ENABLED}
        qos: ${QOS:-}
    """, {"INTERVAL": "2.5", "ENABLED": "false"})
    assert options.port == 1883
    assert options.interval == 2.5
    assert options.enabled is False
    assert options.qos is None  # an empty plain scalar is YAML's null


@pytest.mark.parametrize("scalar", ['"${PORT}"', "'${PORT}'", "!!str ${PORT}", ":${PORT}"])
def test_quoted_tagged_or_partial_reference_stays_a_string(tmp_path: Path, scalar: str) -> None:
    options = toy_options(tmp_path, f"topic: {scalar}\nid: {scalar}\n", {"PORT": "1883"})
    assert isinstance(options.topic, str) and options.topic.endswith("1883")
    assert options.id == options.topic


def test_quoted_reference_for_an_int_option_is_a_type_error(tmp_path: Path) -> None:
    line = single_error(tmp_path, """
        adapters:
          - type: toy
            topic: t
            port: "${PORT}"
    """, {"PORT": "1883"})
    assert line.endswith(":4: adapters[0].port: expected an integer, got '1883'")


def test_retyped_value_is_still_type_checked(tmp_path: Path) -> None:
    line = single_error(tmp_path, """
        adapters:
          - type: toy
            topic: t
            port: ${PORT}
    """, {"PORT": "many"})
    assert line.endswith(":4: adapters[0].port: expected an integer, got 'many'")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("${1BAD}", "invalid reference ${1BAD...}: expected ${NAME} or ${NAME:-default} "
                    "(defaults cannot nest references)"),
        ("${A:-${B}}", "invalid reference ${A...}: expected ${NAME} or ${NAME:-default} "
                       "(defaults cannot nest references)"),
        ("x${OPEN", "'${' is never closed by '}' (write $${ for a literal ${)"),
    ],
)
def test_malformed_references(tmp_path: Path, value: str, problem: str) -> None:
    line = single_error(tmp_path, f"session: {value}\n", {})
    assert line == f"{tmp_path / 'rig.yaml'}:1: session: {problem}"


def test_environ_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXUS_TEST_SOURCE", "from-env")
    path = write(tmp_path, "source_id: ${PLEXUS_TEST_SOURCE}\n")
    config = load_config(path, adapter_types={}, sink_types={})
    assert config.source_id == "from-env"


def test_keys_are_not_interpolated(tmp_path: Path) -> None:
    config = load(write(tmp_path, "tags:\n  ${X}: v\n"), {"X": "k"})
    assert config.tags == {"${X}": "v"}


# ---------------------------------------------------------------------------
# Files that are not YAML mappings


def test_malformed_yaml_names_file_line_and_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """
        source_id: rover
        tags:
          a: [1, 2
        batch: {}
    """)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: invalid YAML: while parsing a flow sequence")
    assert "expected ',' or ']'" in message
    assert "Traceback" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_bad_indentation_is_reported_at_its_line(tmp_path: Path) -> None:
    line = single_error(tmp_path, "source_id: a\n  tags: b\n")
    assert line.startswith(f"{tmp_path / 'rig.yaml'}:2: invalid YAML: ")
    assert "mapping values are not allowed here" in line


def test_unprintable_character_is_reported_at_its_line(tmp_path: Path) -> None:
    line = single_error(tmp_path, "source_id: a\nsession: b\x07\n")
    assert line == (f"{tmp_path / 'rig.yaml'}:2: invalid YAML: special characters are not "
                    "allowed (character #x0007)")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- type: toy\n", "1: the top level must be a mapping of settings (key: value lines), "
                          "got a list"),
        ("# one\n# two\njust text\n", "3: the top level must be a mapping of settings (key: value lines), "
                            "got a single value"),
        ("# nothing\n", "1: the file is empty; expected a mapping of settings (key: value lines)"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    assert errors_of(path) == [f"{path}:{problem}"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml: cannot read the rig file: "
                                          "No such file or directory"):
        load(path)


def test_load_config_text_uses_the_given_file_name() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_config_text("batch:\n  size: 0\n", "inline.yaml", adapter_types={},
                         sink_types={}, environ={})
    assert str(info.value) == "inline.yaml:2: batch.size: must be at least 1, got 0"
    config = load_config_text("source_id: x\n", "inline.yaml", adapter_types={}, sink_types={})
    assert config.path == "inline.yaml" and config.adapters == []


# ---------------------------------------------------------------------------
# The API key


def test_api_key_is_hidden_in_repr(tmp_path: Path) -> None:
    config = load(write(tmp_path, "api_key: plx_supersecret\n"))
    assert config.api_key == "plx_supersecret"
    assert "plx_supersecret" not in repr(config) and "plx_supersecret" not in str(config)
    assert "api_key='***'" in repr(config)


def test_secret_options_are_hidden_in_component_repr(tmp_path: Path) -> None:
    config = load(write(tmp_path, "adapters:\n  - {type: toy, topic: t, password: hunter2}\n"))
    assert "hunter2" not in repr(config)
    assert "password='***'" in repr(config.adapters[0])


@pytest.mark.parametrize(
    "text",
    [
        "api_key: 123456789\n",
        "api_key: [plx_supersecret]\n",
        "api_key: !!int plx_supersecret\n",
        "api_key: ${plx_supersecret BAD:-x}\n",
        "api_key: ${K:-${plx_supersecret}}\n",
        "adapters:\n  - {type: toy, topic: t, password: 123456789}\n",
    ],
)
def test_errors_about_secrets_never_echo_the_value(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = "\n".join(errors_of(path))
    assert "123456789" not in message and "supersecret" not in message
    assert "api_key" in message or "password" in message


def test_api_key_type_error_says_what_was_expected(tmp_path: Path) -> None:
    line = single_error(tmp_path, "api_key: 123456789\n")
    assert line.endswith(":1: api_key: expected a string or null, got an integer (value hidden) "
                         "(quote it to make it a string)")


@pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")
def test_literal_key_in_group_readable_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "api_key: plx_supersecret\n", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="plexus.config"):
        load(path)
    (record,) = [r for r in caplog.records if r.name == "plexus.config"]
    assert str(path) in record.getMessage()
    assert f"chmod 600 {path}" in record.getMessage()
    assert "plx_supersecret" not in record.getMessage()


@pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")
@pytest.mark.parametrize(
    ("text", "mode", "environ"),
    [
        ("api_key: plx_supersecret\n", 0o600, {}),
        ("api_key: ${PLEXUS_API_KEY}\n", 0o644, {"PLEXUS_API_KEY": "plx_k"}),
        ("source_id: x\n", 0o666, {}),
    ],
)
def test_no_warning_for_private_file_or_key_from_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, mode: int,
    environ: dict[str, str],
) -> None:
    path = write(tmp_path, text, mode=mode)
    with caplog.at_level(logging.WARNING, logger="plexus.config"):
        load(path, environ)
    assert [r for r in caplog.records if r.name == "plexus.config"] == []


@pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")
def test_key_written_as_a_default_still_counts_as_in_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "api_key: ${PLEXUS_API_KEY:-plx_inline}\n", mode=0o640)
    with caplog.at_level(logging.WARNING, logger="plexus.config"):
        load(path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# build_options and describe_options directly


def test_build_options_collects_every_problem() -> None:
    where = Where("rig.yaml", 7, "adapters[0]", {"adapters[0].port": 9})
    with pytest.raises(ConfigErrors) as info:
        build_options(ToyOptions, {"port": "x", "mode": "other", "bogus": 1}, where)
    assert str(info.value).splitlines() == [
        "rig.yaml:7: adapters[0].mode: expected one of 'poll', 'push', got 'other'",
        "rig.yaml:7: adapters[0].bogus: unknown key; allowed keys: anything, channels, enabled, "
        "id, interval, limits, mode, password, port, qos, scales, timeout, topic, topics",
        "rig.yaml:7: adapters[0]: missing required key 'topic'",
        "rig.yaml:9: adapters[0].port: expected an integer, got 'x'",
    ]


def test_build_options_converts_ints_to_floats() -> None:
    options = build_options(ToyOptions, {"topic": "t", "interval": 3, "timeout": 4}, Where("x"))
    assert options == ToyOptions(topic="t", interval=3.0, timeout=4.0)
    assert isinstance(options.interval, float) and isinstance(options.timeout, float)


def test_build_options_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigErrors, match=r"^x:1: expected a mapping, got a list$"):
        build_options(ToyOptions, [], Where("x"))


class Opaque:
    """A class pydantic cannot build a schema for."""


def test_build_options_needs_a_dataclass_with_supported_types() -> None:
    @dataclass
    class Odd:
        when: Opaque | None = None

    with pytest.raises(TypeError, match="unsupported option type"):
        build_options(Odd, {"when": 1}, Where("x"))
    with pytest.raises(TypeError, match="not a dataclass or pydantic model"):
        build_options(int, {}, Where("x"))


def test_describe_options_lists_name_type_default_and_help() -> None:
    rows = {row[0]: row[1:] for row in describe_options(ToyOptions)}
    assert rows["topic"] == ("string", "required", "")
    assert rows["interval"] == ("number", "1.0", "seconds")
    assert rows["topics"] == ("list of strings", "[]", "")
    assert rows["qos"] == ("integer or null", "null", "")
    assert rows["mode"] == ("one of 'poll', 'push'", "'poll'", "")
    assert rows["limits.high"] == ("number", "100.0", "")
    assert "limits" not in rows


def test_every_gateway_setting_is_documented_with_its_default() -> None:
    rows = describe_options(GatewaySettings)
    assert {row[0] for row in rows} >= {"api_key", "buffer.type", "batch.max_points",
                                        "retry.max_delay", "status_interval"}
    for name, _type, default, help_text in rows:
        assert "Default" in help_text, name
        assert default != "required", name


def test_rig_config_api_key_repr_without_key() -> None:
    assert "api_key=None" in repr(RigConfig())


# ---------------------------------------------------------------------------
# Options declared as a pydantic model (the other way a plugin may declare them)

from pydantic import Field  # noqa: E402

from plexus.config import OptionsModel, option  # noqa: E402


class Window(OptionsModel):
    width: int = option(10, help="samples", ge=1, le=100)


class ModelOptions(OptionsModel):
    """Options of a plugin's adapter, as a pydantic model."""

    url: str = option(help="where to read")
    rate: float = option(1.0, help="readings per second", gt=0)
    token: str | None = option(None, help="the device token", secret=True)
    mode: Literal["fast", "slow"] = "slow"
    window: Window = Field(default_factory=Window)


class ModelAdapter:
    type_name = "modelled"
    Options = ModelOptions


def test_a_model_options_class_loads_like_a_dataclass(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        adapters:
          - type: modelled
            url: http://x
            rate: 2
            token: s3cret
            window: {width: 5}
    """), adapter_types={"modelled": ModelAdapter}, sink_types={}, environ={})
    options = config.adapters[0].options
    assert options == ModelOptions(url="http://x", rate=2.0, token="s3cret", window=Window(width=5))
    assert isinstance(options.rate, float)
    assert "s3cret" not in repr(config.adapters[0]) and "token='***'" in repr(options)


def test_a_model_options_class_reports_every_problem_in_our_words(tmp_path: Path) -> None:
    path = write(tmp_path, """
        adapters:
          - type: modelled
            rate: 0
            token: 12345
            mode: fats
            window: {width: 500, hight: 2}
    """)
    with pytest.raises(ConfigErrors) as info:
        load_config(path, adapter_types={"modelled": ModelAdapter}, sink_types={}, environ={})
    assert str(info.value).splitlines() == [
        f"{path}:2: adapters[0]: missing required key 'url'",
        f"{path}:3: adapters[0].rate: must be greater than 0, got 0.0",
        f"{path}:4: adapters[0].token: expected a string or null, got an integer (value hidden) "
        "(quote it to make it a string)",
        f"{path}:5: adapters[0].mode: expected one of 'fast', 'slow', got 'fats' "
        "(did you mean 'fast'?)",
        f"{path}:6: adapters[0].window.width: must be between 1 and 100, got 500",
        f"{path}:6: adapters[0].window.hight: unknown key; allowed keys: width",
    ]
    assert "12345" not in str(info.value)


def test_a_model_options_class_is_documented_with_its_limits() -> None:
    rows = {row[0]: row[1:] for row in describe_options(ModelOptions)}
    assert rows["url"] == ("string", "required", "where to read")
    assert rows["rate"] == ("number, > 0", "1.0", "readings per second")
    assert rows["window.width"] == ("integer, >= 1, <= 100", "10", "samples")
