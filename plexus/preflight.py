"""``plexus-gateway --check``: find everything that would fail at start, all at once.

Offline (``--check``), after the rig file itself has validated and every
entry has been built (a callable that does not import, a bad source id):

- each adapter's driver library is installed;
- each adapter's own :meth:`~plexus.adapters.base.Adapter.preflight`: files
  it names exist and load (CAN databases, captures, TLS certificates),
  settings only its driver can judge;
- each sink's driver library is installed, and its own
  :meth:`~plexus.sinks.base.Sink.preflight` (a file sink: its file can be
  created or appended to);
- a Plexus sink has an API key from somewhere;
- the folder a persistent buffer will write to can be written.

Online (``--check --online``) it also touches the world without sending any
data: the platform is asked to accept the key with an empty ``points`` list
(the ingest protocol's auth check), and each adapter's
:meth:`~plexus.adapters.base.Adapter.preflight_online` opens its port,
connects to its broker or finds its interface, then lets go; so does each
sink's :meth:`~plexus.sinks.base.Sink.preflight_online`.

Every problem is a :class:`~plexus.config.ConfigProblem` naming the file,
the line and the entry.
"""

from __future__ import annotations

from pathlib import Path

from plexus.adapters.base import describe_error, require
from plexus.config import ConfigProblem
from plexus.errors import AdapterError
from plexus.gateway import Gateway
from plexus.sinks.http import HttpSink
from plexus.writable import cannot_write

__all__ = ["check_gateway", "check_key_online"]


def check_gateway(gateway: Gateway, *, online: bool = False,
                  timeout: float = 5.0) -> list[ConfigProblem]:
    """Every problem found in a built (not started) gateway; see the module docstring."""
    config = gateway.config
    problems: list[ConfigProblem] = [*gateway.build_problems, *gateway.missing_key_problems()]
    ready = []
    for adapter, _ in gateway.adapters:
        entry = gateway.entries[adapter.name]
        found = []
        for module in type(adapter).requires:
            try:
                require(module, type(adapter).extra or type(adapter).type_name)
            except AdapterError as exc:
                found.append(str(exc))
        if not found:
            try:
                found = adapter.preflight()
            except Exception as exc:  # a plugin's check must not hide the others
                found = [f"its check raised {describe_error(exc)}"]
        problems += [entry.problem(config.path, message) for message in found]
        if not found:
            ready.append((adapter, entry))
    for sink, sink_entry in gateway.sinks:
        sink_cls = type(sink)
        found = []
        for module in sink_cls.requires:
            try:
                require(module, sink_cls.extra or sink_cls.type_name)
            except AdapterError as exc:
                found.append(str(exc))
        if not found:
            try:
                found = sink.preflight()
            except Exception as exc:  # a plugin's check must not hide the others
                found = [f"its check raised {describe_error(exc)}"]
        problems += [sink_entry.problem(config.path, message) if sink_entry
                     else config.problem("sinks", message) for message in found]
    problems += _writable_places(gateway)
    if online:
        for sink, sink_entry in gateway.sinks:
            if isinstance(sink, HttpSink) and gateway.has_api_key \
                    and not config.local_receiver.enabled:
                message = check_key_online(sink, gateway.source_id)
                if message:
                    key = "gateway_url" if message.startswith("cannot reach") else "api_key"
                    problems.append(sink_entry.problem(config.path, message) if sink_entry
                                    else config.problem(key, message))
        for sink, sink_entry in gateway.sinks:
            if sink_entry is None:
                continue
            try:
                found = sink.preflight_online(timeout)
            except Exception as exc:
                found = [f"its online check raised {describe_error(exc)}"]
            problems += [sink_entry.problem(config.path, message) for message in found]
        for adapter, component in ready:
            try:
                found = adapter.preflight_online(timeout)
            except Exception as exc:
                found = [f"its online check raised {describe_error(exc)}"]
            problems += [component.problem(config.path, message) for message in found]
    return problems


def check_key_online(sink: HttpSink, source_id: str) -> str | None:
    """Ask the platform whether it accepts the key (see :meth:`HttpSink.check_key`)."""
    return sink.check_key(source_id)


def _writable_places(gateway: Gateway) -> list[ConfigProblem]:
    config = gateway.config
    problems = []
    if config.buffer.type == "sqlite" and not gateway.dry_run:
        path = Path(config.buffer.path).expanduser() if config.buffer.path else (
            Path.home() / ".plexus" / "buffer" / f"{gateway.source_id}.db")
        if not path.is_absolute():
            path = gateway.base_dir / path
        reason = cannot_write(path)
        if reason:
            problems.append(config.problem("buffer.path", f"the persistent buffer {reason}"))
    return problems
