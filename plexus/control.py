"""The gateway's remote commands: the rig's ``commands:`` section, the built-in
commands over the adapters, the safety rules and the audit file.

The built-ins (``start_can``, ``stop_can``, ``start_mavlink``,
``stop_mavlink``, ``mavlink_command``, ``configure``, ``start_stream``,
``stop_stream``) are registered through the ``plexus_register_commands``
hook by the built-in plugin, exactly as a third-party plugin registers its
own. A handler reaches the running gateway only through :class:`Control`.

Safety: a command runs only if the rig turns commands on; ``deny`` patterns
always win; a non-empty ``allow`` list admits only what it matches; and a
command that can move a vehicle (``mavlink_command``, or a plugin's command
declared with ``moves_vehicle=True``) runs only when ``allow`` names it
exactly: no pattern turns it on. Refused commands are not announced to the
platform, and a run of one fails with ``not_allowed``. Every run, refused
ones included, is logged and appended to the audit file (JSON Lines, mode
0600) with its parameters, secrets hidden.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from plexus.commands import Command, CommandCenter, CommandFailed, Run, declare

if TYPE_CHECKING:
    from plexus.adapters.base import Adapter
    from plexus.gateway import Gateway
    from plexus.link import DeviceLink

log = logging.getLogger(__name__)

BUILTIN_COMMANDS = ("start_can", "stop_can", "start_mavlink", "stop_mavlink",
                    "mavlink_command", "configure", "start_stream", "stop_stream")
_MAV_FORCE = 21196  # param2 of MAV_CMD_COMPONENT_ARM_DISARM that forces it
_MAV_RESULTS = {0: "MAV_RESULT_ACCEPTED", 1: "MAV_RESULT_TEMPORARILY_REJECTED",
                2: "MAV_RESULT_DENIED", 3: "MAV_RESULT_UNSUPPORTED", 4: "MAV_RESULT_FAILED",
                5: "MAV_RESULT_IN_PROGRESS", 6: "MAV_RESULT_CANCELLED"}


def _ws_scheme(value: Any) -> str | None:
    if value.lower().startswith(("ws://", "wss://")):
        return None
    return f"must start with ws:// or wss://, got {value!r}"


@dataclass
class CommandsConfig:
    """The rig file's ``commands:`` section: remote commands from the dashboard."""

    enabled: bool = field(
        default=False,
        metadata={"help": "Open the device link and accept commands from the dashboard. "
                          "Default: false."},
    )
    ws_url: str | None = field(
        default=None,
        metadata={"help": "The device link (ws:// or wss://; /ws/device is appended). Default: "
                          "null, then PLEXUS_GATEWAY_WS_URL, ~/.plexus/config.json "
                          "gateway_ws_url, or wss://gateway.plexus.company.",
                  "check": _ws_scheme},
    )
    allow: list[str] = field(
        default_factory=list,
        metadata={"help": "Commands allowed (names or shell patterns). Default: [], every "
                          "command except those that move a vehicle, which must be named "
                          "here exactly (mavlink_command)."},
    )
    deny: list[str] = field(
        default_factory=list,
        metadata={"help": "Commands refused (names or patterns); wins over allow. Default: []."},
    )
    audit_file: str | None = field(
        default=None,
        metadata={"help": "JSON Lines record of every run (mode 0600), relative to the rig "
                          "file. Default: null, ~/.plexus/audit/<source_id>.jsonl.",
                  "path": True},
    )
    stream_max_seconds: float = field(
        default=300.0,
        metadata={"help": "Longest a start_stream lasts before the rig's settings return. "
                          "Default: 300.0.", "gt": 0},
    )
    mavlink_timeout: float = field(
        default=3.0,
        metadata={"help": "Seconds mavlink_command waits for the vehicle's COMMAND_ACK. "
                          "Default: 3.0.", "gt": 0},
    )



# --------------------------------------------------------------------------
# What a command sees of the gateway


class Control:
    """The running gateway as commands see it; passed to ``plexus_register_commands``.

    Attributes:
        source_id: the gateway's source id.
        base_dir: the rig file's folder (relative paths in params resolve here).
        settings: the rig's :class:`CommandsConfig`.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.source_id: str = gateway.source_id
        self.base_dir: Path = gateway.base_dir
        self.settings: CommandsConfig = gateway.config.commands
        self._lock = threading.RLock()
        self.streams = Streams(self)

    # Adapters ------------------------------------------------------------
    def adapters(self, type_name: str | None = None) -> list[Adapter]:
        """The rig's adapters (of one type), in rig order."""
        return [a for a, _ in self._gateway.adapters
                if type_name is None or a.type_name == type_name]

    def adapter(self, name: str) -> Adapter | None:
        return next((a for a, _ in self._gateway.adapters if a.name == name), None)

    def start_adapter(self, adapter: Adapter) -> None:
        """Start a stopped adapter again with its rig tags.

        Raises:
            AdapterError: it cannot start (missing file, driver...).
        """
        from plexus.pipeline import SourceContext

        with self._lock:
            tags = self._tags(adapter)
            adapter.start(SourceContext(self._gateway.pipeline, tags))
            self.streams.apply_to(adapter)

    def stop_adapter(self, adapter: Adapter, timeout: float = 3.0) -> None:
        with self._lock:
            adapter.stop(timeout)

    def replace_adapter(self, old: Adapter, options: Any) -> Adapter:
        """Stop ``old`` and start an adapter of the same type and name with ``options``.

        If the new one fails to start, ``old`` is started again and the
        error is raised (an AdapterError or ConfigError).
        """
        from plexus.gateway import resolve_paths

        with self._lock:
            options = resolve_paths(options, self.base_dir)
            kwargs: dict[str, Any] = {}
            if old.type_name == "callable":
                kwargs["base_dir"] = self.base_dir
            new = type(old)(options, name=old.name, **kwargs)
            was_running = old.state not in ("stopped", "failed", "finished")
            old.stop(3.0)
            try:
                self.start_adapter_replacing(old, new)
            except Exception:
                if was_running:
                    self.start_adapter(old)
                raise
            return new

    def start_adapter_replacing(self, old: Adapter, new: Adapter) -> None:
        from plexus.pipeline import SourceContext

        tags = self._tags(old)
        new.start(SourceContext(self._gateway.pipeline, tags))
        entries = self._gateway.adapters
        for i, (adapter, entry_tags) in enumerate(entries):
            if adapter is old:
                entries[i] = (new, entry_tags)
        self.streams.apply_to(new)

    def _tags(self, adapter: Adapter) -> dict[str, str] | None:
        return next((t for a, t in self._gateway.adapters if a is adapter), None)

    # Delivery ------------------------------------------------------------
    def emit(self, metric: str, value: Any, timestamp: float | None = None,
             tags: dict[str, str] | None = None) -> None:
        """Send a point through the gateway's pipeline (validated like any other)."""
        self._gateway.pipeline.emit(metric, value, timestamp, tags)

    @property
    def lanes(self) -> list[Any]:
        return list(self._gateway.pipeline.lanes)

    @property
    def batch_interval(self) -> float:
        return float(self._gateway.config.batch.interval)


# --------------------------------------------------------------------------
# Live streams


@dataclass
class _Stream:
    id: str
    patterns: tuple[str, ...]
    interval: float
    ends: float  # monotonic


class Streams:
    """``start_stream``: for a while, chosen metrics go at full rate and uploads
    happen every ``interval_ms``; then the rig's settings return.

    A stream lifts the adapters' thinning (``min_interval``, ``on_change``)
    for matching metrics and shortens the upload interval of every sink; the
    points travel the ordinary path, once, so none is stored twice.
    """

    def __init__(self, control: Control) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._timer: threading.Timer | None = None

    def start(self, patterns: tuple[str, ...], interval: float, duration: float) -> _Stream:
        stream = _Stream(uuid.uuid4().hex[:12], patterns, interval, time.monotonic() + duration)
        with self._lock:
            self._streams[stream.id] = stream
        self._apply()
        return stream

    def stop(self, stream_id: str) -> bool:
        with self._lock:
            found = self._streams.pop(stream_id, None)
        if found is not None:
            self._apply()
        return found is not None

    def stop_all(self) -> None:
        with self._lock:
            self._streams.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._apply()

    @property
    def active(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def _patterns(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted({p for s in self._streams.values() for p in s.patterns}))

    def apply_to(self, adapter: Adapter) -> None:
        setter = getattr(adapter, "set_stream_patterns", None)
        if setter is not None:
            setter(self._patterns())

    def _apply(self) -> None:
        now = time.monotonic()
        with self._lock:
            for sid in [s.id for s in self._streams.values() if s.ends <= now]:
                log.info("stream %s ended: back to the rig's settings", sid)
                del self._streams[sid]
            interval = min((s.interval for s in self._streams.values()), default=None)
            next_end = min((s.ends for s in self._streams.values()), default=None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if next_end is not None:
                self._timer = threading.Timer(max(0.0, next_end - now) + 0.01, self._apply)
                self._timer.daemon = True
                self._timer.start()
        for adapter in self._control.adapters():
            self.apply_to(adapter)
        base = self._control.batch_interval
        for lane in self._control.lanes:
            # The uploader reads its interval at every cycle.
            lane.uploader.interval = base if interval is None else min(base, interval)


# --------------------------------------------------------------------------
# The audit file


class AuditFile:
    """Appends one JSON line per run to a file only its owner can read (0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def check(self) -> None:
        """Create the file (and its folder) now, so a bad path fails at start-up.

        Raises:
            OSError: the folder cannot be made or the file opened.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, default=repr) + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------
# Wiring it into a gateway


class GatewayCommands:
    """The commands of one gateway: the center, the link, the audit file.

    ``problems`` lists what ``--check`` reports (an allow/deny pattern that
    matches no command, a plugin whose command is invalid, an unusable audit
    file or link URL).
    """

    def __init__(self, gateway: Gateway, *, check_only: bool = False) -> None:
        from plexus.plugins import collect_commands

        self.settings: CommandsConfig = gateway.config.commands
        self.control = Control(gateway)
        self.problems: list[str] = []
        self.center = CommandCenter(on_outcome=self._on_outcome)
        audit = self.settings.audit_file
        path = Path(audit).expanduser() if audit else (
            Path.home() / ".plexus" / "audit" / f"{gateway.source_id}.jsonl")
        if not path.is_absolute():
            path = gateway.base_dir / path
        self.audit = AuditFile(path)
        found: dict[str, Command] = {}

        def register(cmd: Any) -> None:
            if not isinstance(cmd, Command):
                raise TypeError(f"{cmd!r} is not a plexus.commands.Command "
                                "(build it with plexus.commands.command or declare)")
            if cmd.name in found:
                raise ValueError(f"command {cmd.name!r} is already registered")
            found[cmd.name] = cmd

        self.problems += collect_commands(gateway.registry, register, self.control)
        for cmd in found.values():
            self.center.add(cmd)
        self._apply_rules(found)
        self.link: DeviceLink | None = None
        if not check_only:
            try:
                self.audit.check()
            except OSError as exc:
                raise _config_error(f"commands.audit_file: cannot write {path}: "
                                    f"{exc.strerror or exc}") from None
        self.link = self._make_link(gateway)

    def _apply_rules(self, commands: dict[str, Command]) -> None:
        allow, deny = self.settings.allow, self.settings.deny
        for label, patterns in (("allow", allow), ("deny", deny)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in commands):
                    self.problems.append(
                        f"commands.{label}: {pattern!r} matches no command (known: "
                        f"{', '.join(sorted(commands))})")
        for name, cmd in commands.items():
            reason = None
            if any(fnmatch.fnmatchcase(name, p) for p in deny):
                reason = f"command {name!r} is denied by the rig (commands.deny)"
            elif cmd.moves_vehicle and name not in allow:
                reason = (f"command {name!r} can move a vehicle and is refused unless the rig "
                          "names it in commands.allow")
            elif allow and not any(fnmatch.fnmatchcase(name, p) for p in allow):
                reason = f"command {name!r} is not in the rig's commands.allow"
            if reason is not None:
                self.center.refuse(name, reason)

    @property
    def allowed(self) -> list[str]:
        return [c["name"] for c in self.center.manifest()]

    def _make_link(self, gateway: Gateway) -> DeviceLink:
        from plexus import __version__
        from plexus.client import read_user_config
        from plexus.errors import ConfigError
        from plexus.link import DEFAULT_WS_URL, DeviceLink

        url = (getattr(gateway, "ws_url", None) or self.settings.ws_url
               or os.environ.get("PLEXUS_GATEWAY_WS_URL")
               or read_user_config().get("gateway_ws_url") or DEFAULT_WS_URL)
        try:
            return DeviceLink(url, gateway.api_key, gateway.source_id, self.center,
                              agent_version=__version__, platform="plexus-gateway",
                              verify_tls=gateway.config.verify_tls,
                              clock=gateway.pipeline.clock)
        except ConfigError as exc:
            raise _config_error(f"commands: {exc}") from None

    def start(self) -> None:
        assert self.link is not None
        self.link.start()

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
        self.center.close()
        self.control.streams.stop_all()

    def _on_outcome(self, record: dict[str, Any]) -> None:
        self.audit.write(record)

    def status(self) -> dict[str, Any]:
        link = self.link.status() if self.link is not None else {"state": "off"}
        return {**link, "last_command": self.center.last, "runs": dict(self.center.counts),
                "streams": self.control.streams.active}


def _config_error(message: str) -> Exception:
    from plexus.errors import ConfigError

    return ConfigError(message)


# --------------------------------------------------------------------------
# The built-in commands


def _split_patterns(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text.startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise CommandFailed("bad_params", f"metrics is not a JSON array: {text[:60]!r}") \
                from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise CommandFailed("bad_params", "metrics must be a list of strings")
        patterns = [i.strip() for i in items]
    else:
        patterns = [p.strip() for p in text.replace(" ", ",").split(",")]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise CommandFailed("bad_params", "metrics names no metric pattern")
    return tuple(patterns)


def _match_adapters(control: Control, type_name: str, key: str | None,
                    option: Callable[[Any], Any], label: str) -> list[Adapter]:
    adapters = control.adapters(type_name)
    if key is None:
        if not adapters:
            raise CommandFailed("not_found", f"the rig has no {type_name} adapter")
        return adapters
    chosen = [a for a in adapters if a.name == key or str(option(a.options)) == key]
    if not chosen:
        known = ", ".join(f"{a.name} ({label} {option(a.options)})" for a in adapters) or "none"
        raise CommandFailed("not_found", f"no {type_name} adapter with {label} or name {key!r} "
                                         f"(the rig's: {known})")
    return chosen


def _adapter_summary(adapter: Adapter) -> dict[str, Any]:
    return {"name": adapter.name, "state": adapter.state}


def builtin_commands(control: Control) -> list[Command]:
    """The gateway's own commands over ``control``."""
    settings = control.settings

    def can_option(options: Any) -> Any:
        return options.channel if options.replay is None else options.replay

    def start_can(run: Run, channel: str | None = None, dbc_path: str | None = None,
                  interval_ms: int | None = None) -> dict[str, Any]:
        adapters = _match_adapters(control, "can", channel, can_option, "channel")
        databases = None
        paths: list[str] = []
        if dbc_path is not None:
            full = Path(dbc_path).expanduser()
            paths = [str(full if full.is_absolute() else control.base_dir / full)]
            try:  # loaded and checked before anything changes
                databases = adapters[0].load_databases(paths)  # type: ignore[attr-defined]
            except Exception as exc:
                raise CommandFailed("bad_params", f"dbc_path: {exc}") from None
        out = []
        for adapter in adapters:
            if databases is not None:
                adapter.replace_databases(paths, databases)  # type: ignore[attr-defined]
            if interval_ms is not None:
                adapter.set_min_interval(interval_ms / 1000.0)  # type: ignore[attr-defined]
            if adapter.state in ("stopped", "failed", "finished"):
                try:
                    control.start_adapter(adapter)
                except Exception as exc:
                    raise CommandFailed("start_failed", f"{adapter.name}: {exc}") from None
            out.append({**_adapter_summary(adapter), "channel": can_option(adapter.options),
                        "dbc": list(adapter.options.dbc),
                        "min_interval_s": adapter.options.min_interval})
        return {"adapters": out}

    def stop_can(run: Run, channel: str | None = None) -> dict[str, Any]:
        adapters = _match_adapters(control, "can", channel, can_option, "channel")
        for adapter in adapters:
            control.stop_adapter(adapter)
        return {"adapters": [_adapter_summary(a) for a in adapters]}

    def mav_option(options: Any) -> Any:
        return options.connection

    def start_mavlink(run: Run, connection_string: str | None = None,
                      interval_ms: int | None = None) -> dict[str, Any]:
        adapters = _match_adapters(control, "mavlink", connection_string, mav_option,
                                   "connection")
        for adapter in adapters:
            if interval_ms is not None:
                adapter.set_min_interval(interval_ms / 1000.0)  # type: ignore[attr-defined]
            if adapter.state in ("stopped", "failed", "finished"):
                try:
                    control.start_adapter(adapter)
                except Exception as exc:
                    raise CommandFailed("start_failed", f"{adapter.name}: {exc}") from None
        return {"adapters": [{**_adapter_summary(a), "connection": a.options.connection,
                              "min_interval_s": a.options.min_interval} for a in adapters]}

    def stop_mavlink(run: Run, connection_string: str | None = None) -> dict[str, Any]:
        adapters = _match_adapters(control, "mavlink", connection_string, mav_option,
                                   "connection")
        for adapter in adapters:
            control.stop_adapter(adapter)
        return {"adapters": [_adapter_summary(a) for a in adapters]}

    def mavlink_command(run: Run, connection_string: str | None = None,
                        command: str | None = None, mode: str | None = None,
                        force: bool = False, **numbers: float) -> dict[str, Any]:
        adapters = _match_adapters(control, "mavlink", connection_string, mav_option,
                                   "connection")
        if len(adapters) > 1:
            raise CommandFailed("bad_params", "several MAVLink adapters: give connection_string "
                                f"(one of {', '.join(a.options.connection for a in adapters)})")
        adapter: Any = adapters[0]
        if adapter.vehicle is None or adapter.link != "up":
            raise CommandFailed("not_connected", f"{adapter.name}: no vehicle is connected "
                                                 f"(link {adapter.link})")
        mavlink = adapter._mavutil.mavlink
        params = [float(numbers.get(f"param{i}", 0.0)) for i in range(1, 8)]
        verb = (command or "").strip()
        if mode is not None and verb.lower() in ("", "set_mode", "mode"):
            mapping = adapter.mode_mapping()
            key = next((k for k in mapping if k.upper() == mode.strip().upper()), None)
            if key is None:
                raise CommandFailed("bad_params", f"unknown flight mode {mode!r} for this "
                                    f"vehicle (known: {', '.join(sorted(mapping)) or 'none'})")
            target = mapping[key]
            cmd_id = mavlink.MAV_CMD_DO_SET_MODE
            if isinstance(target, tuple):  # PX4: (base mode, main mode, sub mode)
                params[:3] = [float(target[0]), float(target[1]), float(target[2])]
            else:
                params[:2] = [float(mavlink.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED), float(target)]
            name = "MAV_CMD_DO_SET_MODE"
        elif verb.lower() in ("arm", "disarm"):
            cmd_id = mavlink.MAV_CMD_COMPONENT_ARM_DISARM
            params[0] = 1.0 if verb.lower() == "arm" else 0.0
            params[1] = float(_MAV_FORCE) if force else 0.0
            name = "MAV_CMD_COMPONENT_ARM_DISARM"
        elif verb:
            name = verb.upper() if verb.upper().startswith("MAV_CMD_") else \
                f"MAV_CMD_{verb.upper()}"
            cmd_id = getattr(mavlink, name, None)
            if not isinstance(cmd_id, int):
                raise CommandFailed("bad_params", f"unknown MAVLink command {verb!r} (arm, "
                                                  "disarm, or a MAV_CMD_* name)")
        else:
            raise CommandFailed("bad_params", "give command (arm, disarm, a MAV_CMD_* name) "
                                              "or mode")

        def on_progress(ack: Any) -> None:
            run.progress(float(getattr(ack, "progress", 0) or 0), "vehicle: in progress")

        try:
            ack = adapter.command_long(cmd_id, params, settings.mavlink_timeout, on_progress)
        except Exception as exc:
            raise CommandFailed("not_connected", str(exc)) from None
        if ack is None:
            raise CommandFailed("timeout", f"no COMMAND_ACK for {name} within "
                                           f"{settings.mavlink_timeout:g} s")
        result = _MAV_RESULTS.get(ack.result, f"MAV_RESULT_{ack.result}")
        if ack.result != 0:
            raise CommandFailed("refused", f"the vehicle answered {name} with {result} "
                                           f"({ack.result})")
        return {"command": name, "command_id": cmd_id, "result": result,
                "result_code": ack.result, "target_system": adapter.vehicle[0]}

    def configure(run: Run, sensor: str, config: str) -> dict[str, Any]:
        from plexus.config import ConfigErrors, Where, build_options

        adapter = control.adapter(sensor)
        if adapter is None:
            names = ", ".join(a.name for a in control.adapters()) or "none"
            raise CommandFailed("bad_params", f"no adapter named {sensor!r} (the rig's: "
                                              f"{names})")
        try:
            changes = orjson.loads(config)
        except orjson.JSONDecodeError as exc:
            raise CommandFailed("bad_params", f"config is not JSON: {exc}") from None
        if not isinstance(changes, dict):
            raise CommandFailed("bad_params", "config must be an object of options")
        current = {f.name: getattr(adapter.options, f.name)
                   for f in dataclasses.fields(adapter.options) if f.init}
        merged = {k: _plain(v) for k, v in current.items()}
        merged.update(changes)
        try:
            options = build_options(type(adapter.options), merged, Where("config", 0, "config"))
        except ConfigErrors as exc:
            problems = "; ".join(f"{p.path}: {p.message}" for p in exc.errors)
            raise CommandFailed("bad_params", problems) from None
        try:
            new = control.replace_adapter(adapter, options)
        except Exception as exc:
            raise CommandFailed("start_failed", f"{sensor}: {exc}; it keeps its old "
                                                "options") from None
        return {"sensor": sensor, "changed": sorted(changes), "state": new.state}

    def start_stream(run: Run, metrics: str, interval_ms: int = 100, store: bool = True,
                     duration_s: float | None = None) -> dict[str, Any]:
        if not store:
            raise CommandFailed("bad_params", "store: false is not supported: this gateway "
                                "sends every point over the platform's ingest, which stores it")
        patterns = _split_patterns(metrics)
        duration = min(duration_s or settings.stream_max_seconds, settings.stream_max_seconds)
        stream = control.streams.start(patterns, interval_ms / 1000.0, duration)
        return {"stream_id": stream.id, "metrics": list(patterns), "interval_ms": interval_ms,
                "expires_in_s": duration}

    def stop_stream(run: Run, stream_id: str) -> dict[str, Any]:
        if not control.streams.stop(stream_id):
            raise CommandFailed("not_found", f"no active stream {stream_id!r}")
        return {"stream_id": stream_id, "stopped": True}

    text = {"type": "string", "maxLength": 4096}
    interval = {"type": "integer", "minimum": 0, "maximum": 3_600_000, "unit": "ms",
                "required": False, "description": "thin every signal to one value per interval"}
    channel = {**text, "required": False, "description": "interface channel or adapter name; "
                                                         "none: every CAN adapter"}
    connection = {**text, "required": False, "description": "connection string or adapter "
                                                            "name; none: every MAVLink adapter"}
    number = {"type": "number", "required": False}
    return [
        declare("start_can", start_can, title="Start CAN", concurrency="reject",
                description="Start the CAN adapter(s); optionally load a new DBC and set "
                            "thinning",
                params={"channel": channel, "dbc_path": {**text, "required": False},
                        "interval_ms": interval}),
        declare("stop_can", stop_can, title="Stop CAN", concurrency="reject",
                params={"channel": channel}),
        declare("start_mavlink", start_mavlink, title="Start MAVLink", concurrency="reject",
                params={"connection_string": connection, "interval_ms": interval}),
        declare("stop_mavlink", stop_mavlink, title="Stop MAVLink", concurrency="reject",
                params={"connection_string": connection}),
        declare("mavlink_command", mavlink_command, title="MAVLink command",
                danger="critical", concurrency="reject", moves_vehicle=True,
                description="arm, disarm (force), a flight mode, or any MAV_CMD_*; the result "
                            "is the vehicle's COMMAND_ACK",
                params={"connection_string": connection,
                        "command": {**text, "required": False},
                        "mode": {**text, "required": False},
                        "force": {"type": "boolean", "default": False},
                        **{f"param{i}": number for i in range(1, 8)}}),
        declare("configure", configure, title="Configure an adapter", danger="dangerous",
                concurrency="reject",
                description="change an adapter's options; checked like the rig file",
                params={"sensor": {**text, "description": "the adapter's name"},
                        "config": {"type": "string", "maxLength": 65536,
                                   "description": "the options to change, a JSON object"}}),
        declare("start_stream", start_stream, title="Start a live stream",
                params={"metrics": {**text, "description": "metric patterns, comma separated"},
                        "interval_ms": {"type": "integer", "minimum": 50, "maximum": 60000,
                                        "default": 100, "unit": "ms"},
                        "store": {"type": "boolean", "default": True},
                        "duration_s": {"type": "number", "minimum": 1, "maximum": 86400,
                                       "required": False, "unit": "s"}}),
        declare("stop_stream", stop_stream, title="Stop a live stream",
                params={"stream_id": {**text}}),
    ]


def _plain(value: Any) -> Any:
    """Options as the rig file writes them (nested dataclasses as mappings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
