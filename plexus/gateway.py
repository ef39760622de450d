"""The gateway: builds sources and sinks from a rig file, runs them, shuts down cleanly.

    sources ──emit──▶ Pipeline ──▶ one buffer + uploader per sink ──▶ sinks

Every configured adapter feeds the one pipeline; every configured sink gets
every point through its own buffer (see ``plexus.pipeline``). With no
``sinks:`` the Plexus HTTP sink is used. A sink's ``upload:`` rules (a byte
budget, metrics held while a condition holds) are applied by its lane; held
points get a persistent buffer of their own (see ``plexus.upload_rules``). Shutdown (a signal, ``--duration``):
adapters stop first, then each sink gets up to ``grace_period`` seconds to
deliver what is buffered; what is left stays in the persistent buffer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from plexus.adapters.base import Adapter, describe_error
from plexus.adapters.callable import CallableAdapter
from plexus.buffer import DEFAULT_MAX_POINTS, Buffer, MemoryBuffer
from plexus.client import config_path, read_user_config, resolve_source_id
from plexus.clock import Clock
from plexus.codec import register_codec
from plexus.config import ComponentConfig, ConfigErrors, ConfigProblem, RigConfig
from plexus.errors import PlexusError
from plexus.pipeline import Pipeline, SourceContext
from plexus.plugins import Registry
from plexus.secret import Secret
from plexus.sinks.base import Sink
from plexus.sinks.http import HttpSink
from plexus.sinks.stdout import StdoutSink
from plexus.sqlite_buffer import (
    DEFAULT_SQLITE_MAX_BYTES,
    DEFAULT_SQLITE_MAX_POINTS,
    SqliteBuffer,
    recorded_owner,
)
from plexus.upload_rules import UploadRules
from plexus.uploader import RetryPolicy

log = logging.getLogger(__name__)


def resolve_paths(options: Any, base_dir: Path) -> Any:
    """Make the options marked as paths relative to the rig file's folder."""
    from plexus.config.options import field_specs

    if not (dataclasses.is_dataclass(options) or hasattr(options, "model_copy")):
        return options
    changes: dict[str, Any] = {}
    for name, spec in field_specs(type(options)).items():  # type: ignore[arg-type]
        if not spec.path:
            continue
        value = getattr(options, name)
        if isinstance(value, str) and value:
            changes[name] = _under(value, base_dir)
        elif isinstance(value, list):
            changes[name] = [_under(v, base_dir) if isinstance(v, str) else v for v in value]
    if not changes:
        return options
    if hasattr(options, "model_copy"):
        return options.model_copy(update=changes)
    return dataclasses.replace(options, **changes)


def _under(value: str, base_dir: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or "://" in value else base_dir / path)


def make_clock(config: RigConfig) -> Clock:
    """The pipeline's clock, as the rig's ``clock:`` section sets it (docs/time.md)."""
    c = config.clock
    return Clock(not_before=c.not_before_s, require_sync=c.require_sync, tolerance=c.tolerance,
                 step_threshold=c.step_threshold, hold_max_points=c.hold_max_points,
                 platform_time=c.platform_time)


class Gateway:
    """Everything a rig file describes, built and ready to start.

    Parameters:
        config: a loaded :class:`~plexus.config.RigConfig`.
        registry: the plugin registry the config was validated against.
        dry_run: replace every sink with ``stdout`` (and start no local receiver).
        check_only: for ``--check``: memory buffers, no local receiver; what
            cannot be built is kept in ``build_problems`` instead of raised.

    Raises:
        ConfigErrors: something in the config cannot be built (a function
            that cannot be imported, a sink's bad URL...): every such
            problem, each with the file, line and entry.
    """

    def __init__(self, config: RigConfig, registry: Registry, *, dry_run: bool = False,
                 check_only: bool = False) -> None:
        self.config = config
        self.check_only = check_only  # build everything, but touch no buffer file
        self.dry_run = dry_run
        self.registry = registry
        self.base_dir = Path(config.path).resolve().parent if config.path else Path.cwd()
        problems: list[ConfigProblem] = []
        user = read_user_config()
        key = config.api_key or os.environ.get("PLEXUS_API_KEY") or user.get("api_key")
        self._api_key = Secret(key) if key else None
        self.gateway_url = (config.gateway_url or os.environ.get("PLEXUS_GATEWAY_URL")
                            or user.get("gateway_url"))
        #: no source_id anywhere: one is generated and saved at the first real run
        self.source_id_pending = check_only and not (
            config.source_id or os.environ.get("PLEXUS_SOURCE_ID") or user.get("source_id"))
        try:
            # A check writes nothing, not even a generated id to ~/.plexus/config.json.
            self.source_id = "source-not-yet-generated" if self.source_id_pending else \
                resolve_source_id(config.source_id, user, config_path())
        except PlexusError as exc:
            problems.append(config.problem("source_id", str(exc)))
            self.source_id = "invalid-source-id"
        self.receiver: Any = None
        self.ws_url: str | None = None  # set by a local receiver
        if not (dry_run or check_only):
            self._start_local_receiver()
        clock = make_clock(config)
        try:
            self.pipeline = Pipeline(self.source_id, config.tags or None, clock=clock)
        except PlexusError as exc:
            problems.append(config.problem("tags", str(exc)))
            self.pipeline = Pipeline(self.source_id, clock=clock)
        #: (sink, the rig entry it comes from; None for the default sink)
        self.sinks: list[tuple[Sink, ComponentConfig | None]] = []
        self._build_lanes(dry_run, problems)
        self.adapters: list[tuple[Adapter, dict[str, str] | None]] = []
        #: each adapter's rig entry, for messages that name its line
        self.entries: dict[str, ComponentConfig] = {}
        for component in config.adapters:
            try:
                adapter = self.build_adapter(component)
            except Exception as exc:  # a plugin's constructor may raise anything
                problems.append(component.problem(config.path, describe_error(exc)))
                continue
            self.adapters.append((adapter, component.tags or None))
            self.entries[adapter.name] = component
        #: for --check: what could not be built; the rest is still checked
        self.build_problems = problems
        if problems and not check_only:
            self._release()
            raise ConfigErrors(problems)
        self._stop = threading.Event()
        self.started_at: float | None = None
        self.commands: Any = None  # plexus.control.GatewayCommands when the rig turns them on
        if config.commands.enabled:
            from plexus.control import GatewayCommands

            self.commands = GatewayCommands(self, check_only=check_only)

    @property
    def api_key(self) -> Secret | None:
        return self._api_key

    def _release(self) -> None:
        """Undo what __init__ started, when it cannot finish."""
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None

    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    def missing_key_problems(self) -> list[ConfigProblem]:
        """A Plexus sink with no API key anywhere: it could deliver nothing."""
        problems: list[ConfigProblem] = []
        if self.config.local_receiver.enabled:
            return problems  # the bundled receiver takes any key
        for sink, entry in self.sinks:
            if not isinstance(sink, HttpSink) or self._api_key is not None:
                continue
            if entry is not None and getattr(entry.options, "api_key", None):
                continue
            message = ("no API key for the Plexus platform: set the environment variable "
                       "PLEXUS_API_KEY, or write api_key: ${PLEXUS_API_KEY} in the rig file "
                       "(or put {\"api_key\": ...} in ~/.plexus/config.json)")
            problems.append(entry.problem(self.config.path, message) if entry is not None
                            else self.config.problem("api_key", message))
        return problems

    # Building ------------------------------------------------------------
    def build_adapter(self, component: ComponentConfig) -> Adapter:
        """An adapter for a rig entry, not started. Raises what its constructor raises."""
        options = resolve_paths(component.options, self.base_dir)
        kwargs: dict[str, Any] = {}
        if issubclass(component.cls, CallableAdapter):
            kwargs["base_dir"] = self.base_dir
        adapter: Adapter = component.cls(options, name=component.name, **kwargs)
        if getattr(adapter, "acknowledges_upstream", False) and \
                self.config.buffer.type == "memory":
            log.warning(
                "adapter %s acknowledges messages once they are buffered, but the buffer "
                "is in memory: a crash loses what was acknowledged and not yet sent; use "
                "buffer: {type: sqlite}", adapter.name)
        return adapter

    def _start_local_receiver(self) -> None:
        local = self.config.local_receiver
        if not local.enabled or self.check_only:
            return
        from plexus.testing import Receiver

        self.receiver = Receiver(port=local.port, api_keys=None).start()
        self.gateway_url = self.receiver.url
        self.ws_url = self.receiver.ws_url
        if self._api_key is None:
            self._api_key = Secret("plx_local")
        log.info("local receiver listening on %s", self.receiver.url)

    def sink_components(
        self, config: RigConfig | None = None,
    ) -> list[tuple[type[Sink], Any, str, ComponentConfig | None]]:
        """(class, options, name, rig entry) of each sink ``config`` (default: the
        running one) asks for; the default Plexus sink has no entry."""
        config = config or self.config
        if self.dry_run:  # points are printed, not uploaded: no upload rules
            return [(StdoutSink, StdoutSink.Options(), "stdout", None)]
        if not config.sinks:
            return [(HttpSink, HttpSink.Options(), "plexus", None)]
        return [(c.cls, resolve_paths(c.options, self.base_dir), c.name, c)
                for c in config.sinks]

    def build_sink(self, cls: type[Sink], options: Any, name: str,
                   config: RigConfig | None = None) -> Sink:
        """A sink, not opened; a Plexus sink gets the key, URL, TLS and timeout
        settings of ``config`` (default: the running one). Raises what its
        constructor raises."""
        cfg = config or self.config
        if issubclass(cls, HttpSink):
            options = dataclasses.replace(
                options,
                verify_tls=options.verify_tls and cfg.verify_tls,
                timeout=cfg.timeout if options.timeout == HttpSink.Options().timeout
                else options.timeout,
            )
            return cls(options, name=name, api_key=self._api_key, gateway_url=self.gateway_url)
        return cls(options, name=name)

    def uploader_options(self, config: RigConfig | None = None) -> dict[str, Any]:
        """What each sink's uploader is built with, from ``config``'s batch and retry."""
        cfg = config or self.config
        return {"batch_size": cfg.batch.size, "interval": cfg.batch.interval,
                "max_batch": cfg.batch.max_points,
                "retry": RetryPolicy(retries=cfg.retry.retries, base=cfg.retry.base,
                                     max_delay=cfg.retry.max_delay)}

    def _resolve_rules(self, rules: UploadRules | None) -> UploadRules | None:
        """A hold condition's file is relative to the rig file's folder, like other paths."""
        if rules is None:
            return None
        changes = {}
        for name in ("hold_while", "hold_unless"):
            spec = getattr(rules, name)
            if spec is not None and spec.file is not None:
                changes[name] = dataclasses.replace(spec, file=_under(spec.file, self.base_dir))
        return dataclasses.replace(rules, **changes) if changes else rules

    def _build_lanes(self, dry_run: bool, problems: list[ConfigProblem]) -> None:
        cfg = self.config
        for index, (cls, options, name, entry) in enumerate(self.sink_components()):
            try:
                sink = self.build_sink(cls, options, name)
            except Exception as exc:
                problems.append(entry.problem(cfg.path, describe_error(exc)) if entry else
                                cfg.problem("gateway_url", describe_error(exc)))
                continue
            self.sinks.append((sink, entry))
            if problems:
                continue  # nothing will run: open no buffer file
            # A plugin's own codec must be known before its buffer recovers records.
            register_codec(sink.codec(self.source_id))
            rules = self.upload_rules(entry)
            held_buffer = self.make_buffer(index, name, held=True) \
                if rules is not None and rules.hold else None
            self.pipeline.add_lane(sink, self.make_buffer(index, name), rules=rules,
                                   held_buffer=held_buffer, tags=entry.tags if entry else None,
                                   **self.uploader_options())

    def upload_rules(self, entry: ComponentConfig | None) -> UploadRules | None:
        """A sink entry's upload rules, their paths resolved; None without rules."""
        return self._resolve_rules(entry.upload if entry is not None else None)

    def make_buffer(self, index: int, sink_name: str, held: bool = False) -> Buffer:
        """The buffer of the sink named ``sink_name`` (at ``index`` in the rig): its
        own file, found by the name it was claimed with (and, with ``held``, the
        one for its held points)."""
        opts = self.config.buffer
        if opts.type == "memory" or self.check_only:
            return MemoryBuffer(opts.max_points or DEFAULT_MAX_POINTS, opts.when_full)
        path = Path(opts.path).expanduser() if opts.path else (
            Path.home() / ".plexus" / "buffer" / f"{self.source_id}.db"
        )
        if not path.is_absolute():
            path = self.base_dir / path
        if held:
            # A folder of its own: no sink name can make it collide with a lane's file.
            path = path.with_name(f"{path.stem}.held") / f"{sink_name}{path.suffix}"
        else:
            path = self._lane_file(path, index, sink_name)
        buffer = SqliteBuffer(path, opts.max_points or DEFAULT_SQLITE_MAX_POINTS,
                              sync_interval=opts.sync_interval,
                              max_bytes=opts.max_bytes or DEFAULT_SQLITE_MAX_BYTES,
                              when_full=opts.when_full)
        buffer.claim(sink_name)
        return buffer

    @staticmethod
    def _lane_file(base: Path, index: int, sink_name: str) -> Path:
        """Which file holds a sink's points: the configured path for the first sink,
        ``<stem>.<sink name><suffix>`` beside it for the others. A file names the
        sink that claimed it, so a sink keeps its own file when the rig's sinks
        are reordered, and never takes over another's backlog."""
        named = base.with_name(f"{base.stem}.{sink_name}{base.suffix}")
        owner = recorded_owner(base)
        if owner == sink_name:
            return base
        if named.exists():
            return named
        if index == 0 and owner is None:  # new, or from before files named their sink
            return base
        if index == 0:
            log.warning("buffer file %s holds the points of sink %s, not of %s (the sinks "
                        "were reordered or renamed); %s uses %s", base, owner, sink_name,
                        sink_name, named)
        return named

    # Running -------------------------------------------------------------
    def start(self) -> None:
        """Open the sinks, start the uploaders, then every adapter."""
        self.pipeline.start()
        self.started_at = time.time()
        if self.config.session:
            self.pipeline.begin_session(self.config.session, self.config.session_tags or None)
        for adapter, tags in self.adapters:
            try:
                adapter.start(SourceContext(self.pipeline, tags))
            except Exception as exc:  # one adapter failing never stops the others
                adapter.state = "failed"
                adapter.errors += 1
                adapter.last_error = describe_error(exc)
                log.error("adapter %s failed to start: %s", adapter.name, adapter.last_error)
        if self.commands is not None:
            self.commands.start()

    def failed_adapters(self) -> list[Adapter]:
        return [adapter for adapter, _ in self.adapters if adapter.state == "failed"]

    def nothing_left_to_run(self) -> bool:
        """Every adapter has failed for good or finished (a capture replayed once), and no
        remote command could start one again."""
        return self.commands is None and bool(self.adapters) and all(
            adapter.state in ("failed", "finished") for adapter, _ in self.adapters)

    def hold_gate(self, sink_name: str) -> Any:
        """The :class:`~plexus.conditions.HoldGate` of a sink's held lane, or None.

        ``gate.set_override(True | False | None)`` forces a hold on or off, or gives
        it back to its condition: the seam for a remote command.
        """
        for lane in self.pipeline.lanes:
            if lane.sink.name == sink_name and lane.held is not None:
                return lane.held.gate
        return None

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self, duration: float | None = None, on_tick: Any = None,
             tick: float = 1.0) -> None:
        """Block until :meth:`request_stop` or ``duration`` seconds; call ``on_tick`` each tick."""
        deadline = None if duration is None else time.monotonic() + duration
        while not self._stop.is_set():
            timeout = tick if deadline is None else min(tick, deadline - time.monotonic())
            if timeout <= 0:
                break
            self._stop.wait(timeout)
            if on_tick is not None:
                on_tick()

    def shutdown(self, grace_period: float | None = None) -> None:
        """Stop adapters, deliver for up to ``grace_period`` seconds, close everything."""
        grace = self.config.grace_period if grace_period is None else grace_period
        if self.commands is not None:  # no command may start while adapters stop
            self.commands.stop()
        stoppers = [threading.Thread(target=a.stop, args=(2.0,)) for a, _ in self.adapters]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.pipeline.close(grace)
        if self.receiver is not None:
            self.receiver.stop()

    # Status --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.time()
        adapters = []
        for adapter, _ in self.adapters:
            h = adapter.health()
            adapters.append({
                "name": h.name, "type": h.type, "state": h.state, "points": h.points,
                "errors": h.errors, "last_point_age": None if h.last_point_time is None
                else round(now - h.last_point_time, 1), "last_error": h.last_error,
                "details": h.extra,
            })
        sinks = []
        for lane in self.pipeline.lanes:
            st = lane.uploader.stats
            opener = lane.opener
            opening = opener is not None and opener.state == "opening"
            held = lane.held
            stamps = [st.last_success] + ([held.uploader.stats.last_success] if held else [])
            last_success = max((t for t in stamps if t is not None), default=None)
            entry: dict[str, Any] = {
                "name": lane.sink.name, "state": opener.state if opener else "closed",
                "buffered": len(lane.buffer),
                "delivered": st.delivered + (held.uploader.stats.delivered if held else 0),
                "dropped": lane.dropped,
                "rejected": st.rejected + (held.uploader.stats.rejected if held else 0),
                "since_last_upload": None if last_success is None
                else round(now - last_success, 1),
                "last_error": _open_error(opener) if opening
                else st.last_error or (held.uploader.stats.last_error if held else None),
            }
            if held is not None:
                entry["held"] = len(held.buffer)
                entry["holding"] = held.gate.holding
                entry["hold_rule"] = held.gate.rules.describe_hold()
            if lane.budget is not None:
                entry["max_bytes_per_s"] = int(lane.budget.rate)
                entry["bytes_sent"] = lane.sink.bytes_sent
            sinks.append(entry)
        return {"source_id": self.source_id, "session": self.pipeline.current_session,
                "uptime": round(now - (self.started_at or now), 1),
                "adapters": adapters, "sinks": sinks,
                "link": None if self.commands is None else self.commands.status(),
                "clock": self.pipeline.clock.status()}


def _open_error(opener: Any) -> str:
    """Why a sink is not open yet, and when it is tried again."""
    text = f"cannot open: {opener.last_error}"
    if opener.next_attempt_at is not None:
        text += f"; next attempt in {max(0.0, opener.next_attempt_at - time.time()):.0f} s"
    return text
