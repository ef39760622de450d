"""The built-in adapters, sinks and gateway commands: a plugin like any other.

Driver libraries (python-can, paho-mqtt, ...) are not imported here; each
adapter imports its driver only when a rig file uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plexus import hookimpl


@hookimpl
def plexus_register_adapters(register: Callable[[type[Any]], None]) -> None:
    from plexus.adapters.callable import CallableAdapter
    from plexus.adapters.can import CanAdapter
    from plexus.adapters.mavlink import MavlinkAdapter
    from plexus.adapters.mqtt import MqttAdapter
    from plexus.adapters.serial import SerialAdapter

    for cls in (CallableAdapter, CanAdapter, MqttAdapter, MavlinkAdapter, SerialAdapter):
        register(cls)


@hookimpl
def plexus_register_sinks(register: Callable[[type[Any]], None]) -> None:
    from plexus.sinks.file import FileSink
    from plexus.sinks.http import HttpSink
    from plexus.sinks.influxdb import InfluxdbSink
    from plexus.sinks.mqtt import MqttSink
    from plexus.sinks.nats import NatsSink
    from plexus.sinks.stdout import StdoutSink

    for cls in (HttpSink, FileSink, StdoutSink, MqttSink, InfluxdbSink, NatsSink):
        register(cls)


@hookimpl
def plexus_register_commands(register: Callable[[Any], None], control: Any) -> None:
    from plexus.control import builtin_commands

    for cmd in builtin_commands(control):
        register(cmd)
