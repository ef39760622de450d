"""Reload: re-read the rig file on SIGHUP (``systemctl reload``) without losing a point.

The rules (docs/operations.md says the same to users):

1. The file is loaded and validated first. An invalid file changes nothing:
   the problems are logged, one per line, and the gateway goes on as it was.
2. Everything new is built before anything running is touched (adapters,
   sinks, their buffers); if any of it fails, nothing changes either.
3. Adapters are matched by name. One whose entry (type, options, tags) did
   not change keeps running, untouched. A changed one is stopped and its
   replacement started; new ones start, removed ones stop.
4. Sinks are matched by name. An unchanged sink keeps running. A changed
   one **hands its buffer over**: its uploader stops after the request now
   on the wire, the new sink gets the same buffer (same file, same points,
   the batch given back first with its key) and a new uploader. Nothing is
   drained, so a slow sink does not hold the reload, and nothing waits
   twice. A removed sink stops taking points and gets ``grace_period``
   seconds to deliver what it holds, as at shutdown; what is left stays in
   its persistent buffer (a memory buffer's rest is lost, and logged).
   Changing ``batch`` or ``retry`` changes every sink; ``api_key``,
   ``gateway_url``, ``verify_tls`` and ``timeout`` change every Plexus sink.
   A sink's ``upload:`` rules count as its options: a change hands over the
   held lane's buffer too (a sink that starts holding gets one); a sink
   that stops holding keeps its old settings until a restart, so its held
   points are not stranded.
5. ``tags``, ``session``/``session_tags``, ``grace_period``, ``log_level``,
   ``status_interval``, ``metrics``, ``agent_metrics`` and ``log_events``
   apply at once. ``source_id``, ``buffer``, ``local_receiver`` and
   ``commands`` take effect at the next restart: a change to them is logged
   and the running values stay.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plexus.adapters.base import Adapter, describe_error
from plexus.codec import register_codec
from plexus.config import ComponentConfig, ConfigErrors, RigConfig
from plexus.errors import PlexusError
from plexus.pipeline import Lane, SourceContext
from plexus.secret import Secret
from plexus.sinks.base import Sink
from plexus.sinks.http import HttpSink

__all__ = ["ReloadRefused", "ReloadResult", "Reloader", "plan_reload"]

log = logging.getLogger("plexus.reload")

#: Keys a reload cannot change in a running gateway.
RESTART_ONLY = ("source_id", "buffer", "local_receiver", "commands")
#: Keys every sink is built with: a change rebuilds them all.
ALL_SINKS = ("batch", "retry")
#: Keys every Plexus (HTTP) sink is built with.
PLEXUS_SINKS = ("api_key", "gateway_url", "verify_tls", "timeout")


class ReloadRefused(PlexusError):
    """The new rig file is invalid or cannot be built; nothing was changed."""


@dataclass
class ReloadPlan:
    adapters: dict[str, list[str]] = field(default_factory=dict)  # kept/changed/added/removed
    sinks: dict[str, list[str]] = field(default_factory=dict)
    restart_only: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # other top-level keys that changed

    def describe(self) -> str:
        parts = []
        for kind, groups in (("adapters", self.adapters), ("sinks", self.sinks)):
            words = [f"{verb} {', '.join(names)}" for verb in ("changed", "added", "removed",
                                                                "kept")
                     if (names := groups.get(verb))]
            if words:
                parts.append(f"{kind}: " + "; ".join(words))
        if self.settings:
            parts.append("settings: " + ", ".join(self.settings))
        if not self.changed:
            return "nothing changed" + (f" ({'; '.join(parts)})" if parts else "")
        return "; ".join(parts)

    @property
    def changed(self) -> bool:
        return bool(self.settings) or any(groups.get(verb) for groups in (self.adapters,
                                                                          self.sinks)
                                          for verb in ("changed", "added", "removed"))


@dataclass
class ReloadResult:
    plan: ReloadPlan
    seconds: float
    problems: list[str] = field(default_factory=list)  # parts that could not be applied


def _same_entry(a: ComponentConfig, b: ComponentConfig) -> bool:
    return (a.type == b.type and a.cls is b.cls and (a.tags or {}) == (b.tags or {})
            and a.options == b.options)


def _changed_settings(old: RigConfig, new: RigConfig) -> list[str]:
    from plexus.config import GatewaySettings

    return [name for name in GatewaySettings.model_fields
            if getattr(old, name) != getattr(new, name)]


def plan_reload(old: RigConfig, new: RigConfig,
                old_sinks: list[tuple[type, Any, str, Any]],
                new_sinks: list[tuple[type, Any, str, Any]]) -> ReloadPlan:
    """What a reload from ``old`` to ``new`` does (sinks as (class, options, name,
    what else their entry sets: upload rules, tags))."""
    plan = ReloadPlan()
    changed = _changed_settings(old, new)
    plan.restart_only = [k for k in changed if k in RESTART_ONLY]
    plan.settings = [k for k in changed if k not in RESTART_ONLY]
    before = {c.name: c for c in old.adapters}
    after = {c.name: c for c in new.adapters}
    plan.adapters = {
        "kept": [n for n in after if n in before and _same_entry(before[n], after[n])],
        "changed": [n for n in after if n in before and not _same_entry(before[n], after[n])],
        "added": [n for n in after if n not in before],
        "removed": [n for n in before if n not in after],
    }
    every = any(k in changed for k in ALL_SINKS)
    plexus_wide = any(k in changed for k in PLEXUS_SINKS)
    old_by_name = {name: (cls, options, rules) for cls, options, name, rules in old_sinks}
    plan.sinks = {"kept": [], "changed": [], "added": [], "removed": []}
    for cls, options, name, rules in new_sinks:
        if name not in old_by_name:
            plan.sinks["added"].append(name)
            continue
        old_cls, old_options, old_rules = old_by_name[name]
        same = (old_cls is cls and old_options == options and old_rules == rules
                and not every and not (plexus_wide and issubclass(cls, HttpSink)))
        plan.sinks["kept" if same else "changed"].append(name)
    names = {name for _, _, name, _ in new_sinks}
    plan.sinks["removed"] = [name for _, _, name, _ in old_sinks if name not in names]
    return plan


class Reloader:
    """Applies a rig file to a running :class:`~plexus.gateway.Gateway`.

    Parameters:
        gateway: the running gateway.
        load: reads and validates the rig file (default: the CLI's ``load_rig``);
            returns ``(config, registry)`` or raises ConfigErrors.
        on_settings: called with the new config and the changed top-level
            keys, after the rest is applied (the service applies metrics,
            agent and log settings there).
    """

    def __init__(self, gateway: Any, *, load: Callable[[str], tuple[Any, Any]] | None = None,
                 on_settings: Callable[[RigConfig, list[str]], None] | None = None) -> None:
        self.gateway = gateway
        self._load = load or _load_rig
        self._on_settings = on_settings
        self._lock = threading.Lock()  # one reload at a time
        self.reloads = 0
        self.failures = 0

    def reload(self) -> ReloadResult:
        """Re-read the rig file and apply it.

        Raises:
            ReloadRefused: the file is invalid or something new cannot be
                built; the running gateway is untouched.
        """
        with self._lock:
            started = time.monotonic()
            try:
                result = self._reload()
            except ReloadRefused:
                self.failures += 1
                raise
            result.seconds = time.monotonic() - started
            self.reloads += 1
            return result

    # Steps -----------------------------------------------------------------------
    def _reload(self) -> ReloadResult:
        gw = self.gateway
        path = gw.config.path
        try:
            new, _registry = self._load(path)
        except ConfigErrors as exc:
            raise ReloadRefused(_problems_text(path, exc)) from None
        except PlexusError as exc:
            raise ReloadRefused(f"{path}: {exc}") from None
        old = gw.config
        keep = {k: getattr(old, k) for k in RESTART_ONLY}
        plan = plan_reload(old, new, _sink_triples(gw.sink_components(old)),
                           _sink_triples(gw.sink_components(new)))
        for key in plan.restart_only:
            log.warning("reload: %s changed; it takes effect at the next restart (the running "
                        "value stays)", key)
        merged = new.model_copy(update=keep)
        merged._lines = dict(getattr(new, "_lines", {}))
        built = self._build(merged, plan)
        problems = self._apply(merged, plan, built)
        if self._on_settings is not None:
            try:
                self._on_settings(merged, plan.settings)
            except Exception as exc:
                problems.append(f"settings: {describe_error(exc)}")
        return ReloadResult(plan, 0.0, problems)

    def _build(self, new: RigConfig, plan: ReloadPlan) -> dict[str, Any]:
        """Everything new, before anything running is touched; ReloadRefused if any fails."""
        gw = self.gateway
        problems: list[str] = []
        adapters: dict[str, Adapter] = {}
        entries = {c.name: c for c in new.adapters}
        for name in plan.adapters["changed"] + plan.adapters["added"]:
            try:
                adapters[name] = gw.build_adapter(entries[name])
            except Exception as exc:
                problems.append(str(entries[name].problem(new.path, describe_error(exc))))
        key, url = _key_and_url(gw, new)
        old_key, old_url = gw._api_key, gw.gateway_url
        gw._api_key, gw.gateway_url = key, url  # what build_sink gives Plexus sinks
        sinks: dict[str, tuple[Sink, Any, Any]] = {}  # the sink, its upload rules, its tags
        buffers: dict[str, Any] = {}  # new sinks' buffers
        held: dict[str, Any] = {}  # new held buffers (a sink that starts holding)
        lanes = {lane.sink.name: lane for lane in gw.pipeline.lanes}
        for name in list(plan.sinks["changed"]):
            entry = next((c for c in new.sinks if c.name == name), None)
            rules = gw.upload_rules(entry)
            if lanes[name].held is not None and not (rules is not None and rules.hold):
                # Its held points would have no lane to wait in: they stay where they are.
                plan.sinks["changed"].remove(name)
                plan.sinks.setdefault("kept", []).append(name)
                log.warning("reload: sink %s no longer holds points; that change takes effect "
                            "at the next restart (its held points stay with it)", name)
        try:
            components = gw.sink_components(new)
            for index, (cls, options, name, entry) in enumerate(components):
                if name not in plan.sinks["changed"] + plan.sinks["added"]:
                    continue
                try:
                    rules = gw.upload_rules(entry)
                    sink = gw.build_sink(cls, options, name, new)
                    sinks[name] = (sink, rules, (entry.tags or None) if entry else None)
                    holds = rules is not None and bool(rules.hold)
                    if name in plan.sinks["added"]:
                        register_codec(sink.codec(gw.source_id))  # before its buffer opens
                        buffers[name] = gw.make_buffer(index, name)
                    if holds and (name in plan.sinks["added"] or lanes[name].held is None):
                        held[name] = gw.make_buffer(index, name, held=True)
                except Exception as exc:
                    where = entry.problem(new.path, describe_error(exc)) if entry else \
                        f"{new.path}: sink {name}: {describe_error(exc)}"
                    problems.append(str(where))
        finally:
            if problems:
                gw._api_key, gw.gateway_url = old_key, old_url
        if problems:
            for buffer in [*buffers.values(), *held.values()]:
                buffer.close()
            raise ReloadRefused(f"{new.path}: {len(problems)} problem(s); nothing was "
                                "changed:\n" + "\n".join(f"  {p}" for p in problems))
        return {"adapters": adapters, "sinks": sinks, "buffers": buffers, "held": held}

    def _apply(self, new: RigConfig, plan: ReloadPlan, built: dict[str, Any]) -> list[str]:
        gw = self.gateway
        problems: list[str] = []
        control = getattr(gw.commands, "control", None)
        lock = control._lock if control is not None else threading.RLock()
        with lock:
            # Adapters that go or change stop first, so nothing they emit is
            # routed to a sink that is leaving.
            leaving = set(plan.adapters["changed"] + plan.adapters["removed"])
            _stop_all([a for a, _ in gw.adapters if a.name in leaving])
            problems += self._apply_sinks(new, plan, built)
            try:
                gw.pipeline.set_tags(new.tags or None)
            except PlexusError as exc:
                problems.append(f"tags: {exc}")
            self._apply_session(new)
            entries = {c.name: c for c in new.adapters}
            running = {a.name: (a, t) for a, t in gw.adapters}
            adapters: list[tuple[Adapter, dict[str, str] | None]] = []
            for name, component in entries.items():
                if name in built["adapters"]:
                    adapter = built["adapters"][name]
                    tags = component.tags or None
                    try:
                        adapter.start(SourceContext(gw.pipeline, tags))
                    except Exception as exc:  # as at start: counted, and the rest goes on
                        adapter.state = "failed"
                        adapter.errors += 1
                        adapter.last_error = describe_error(exc)
                        problems.append(f"adapter {name} failed to start: {adapter.last_error}")
                    if control is not None:
                        control.streams.apply_to(adapter)
                    adapters.append((adapter, tags))
                elif name in running:
                    adapters.append(running[name])
            gw.adapters[:] = adapters  # in place: the commands' Control holds this list
            gw.entries = dict(entries)
            gw.config = new
        return problems

    def _apply_sinks(self, new: RigConfig, plan: ReloadPlan, built: dict[str, Any]) -> list[str]:
        gw = self.gateway
        problems: list[str] = []
        options = gw.uploader_options(new)
        lanes = {lane.sink.name: lane for lane in gw.pipeline.lanes}
        for name in plan.sinks["added"]:
            sink, rules, tags = built["sinks"][name]
            lane = gw.pipeline.add_lane(sink, built["buffers"][name], rules=rules,
                                        held_buffer=built["held"].get(name), tags=tags, **options)
            gw.pipeline.open_lane(lane)  # a sink that cannot open yet is retried, as at start
        for name in plan.sinks["changed"]:
            sink, rules, tags = built["sinks"][name]
            problem = _hand_over(gw.pipeline, lanes[name], sink, rules, tags,
                                 built["held"].get(name), options)
            if problem:
                problems.append(problem)
        for name in plan.sinks["removed"]:
            lane = lanes[name]
            gw.pipeline.remove_lane(lane)
            threading.Thread(target=_retire, args=(lane, new.grace_period), daemon=True,
                             name=f"plexus-retire:{name}").start()
        entries = {c.name: c for c in new.sinks}
        gw.sinks = [(lane.sink, entries.get(lane.sink.name)) for lane in gw.pipeline.lanes]
        return problems

    def _apply_session(self, new: RigConfig) -> None:
        gw = self.gateway
        old = gw.config
        if (old.session, old.session_tags) == (new.session, new.session_tags):
            return
        if old.session:
            gw.pipeline.end_session(old.session)
        if new.session:
            try:
                gw.pipeline.begin_session(new.session, new.session_tags or None)
            except PlexusError as exc:
                log.error("reload: session %r could not begin: %s", new.session, exc)


def _hand_over(pipeline: Any, lane: Lane, sink: Sink, rules: Any, tags: Any, new_held: Any,
               options: dict[str, Any]) -> str | None:
    """Give ``lane``'s buffer (and held buffer) to ``sink`` in a new lane; the old
    sink closes. The new sink opens as at start (retried while it cannot).
    Returns a problem or None."""
    if lane.opener is not None:
        lane.opener.stop(0.0)
    olds = [lane.uploader] + ([lane.held.uploader] if lane.held is not None else [])
    for uploader in olds:
        uploader.stop(0.0)  # ends after the request on the wire, if any; nothing drained
    if lane.held is not None:
        lane.held.gate.stop()
    timeout = getattr(getattr(lane.sink, "options", None), "timeout", None)
    if not all(uploader.join(float(timeout or 30.0) + 10.0) for uploader in olds):
        # Its request outlived the sink's own timeout: a new uploader would fight it
        # for the batch. Health reports the lane stuck, and the watchdog restarts.
        if new_held is not None:
            new_held.close()
        return (f"sink {lane.sink.name}: its request did not end in time; its new settings "
                "wait for a restart")
    held = lane.held.buffer if lane.held is not None else new_held
    if not (rules is not None and rules.hold):
        held = None
    new = pipeline.make_lane(sink, lane.buffer, rules=rules, held_buffer=held, tags=tags,
                             **options)
    new.uploader.side = lane.uploader.side  # health reports waiting for the sink
    new.uploader.stats = lane.uploader.stats  # the sink's counts go on across the reload
    pipeline.replace_lane(lane, new)
    pipeline.open_lane(new)
    if lane.opener is None or lane.opener.opened:
        try:
            lane.sink.close()
        except Exception as exc:
            log.warning("closing the old sink %s failed: %s", lane.sink.name,
                        describe_error(exc))
    return None


def _retire(lane: Lane, grace: float) -> None:
    """A removed sink: deliver for up to ``grace`` seconds, then close, as at shutdown."""
    if lane.opener is not None:
        lane.opener.stop(0.0)
    if lane.held is not None:
        lane.held.uploader.stop(0.0)  # held points wait for the hold to clear, on disk
        lane.held.gate.stop()
    lane.uploader.stop(grace)
    left = len(lane)
    if left:
        log.warning("sink %s was removed with %d points not delivered%s", lane.sink.name, left,
                    "; they stay in its persistent buffer" if hasattr(lane.buffer, "path")
                    else " (memory buffer: lost)")
    try:
        if lane.held is not None:
            lane.held.buffer.close()
        lane.buffer.close()
    finally:
        if lane.opener is None or lane.opener.opened:
            lane.sink.close()


def _stop_all(adapters: list[Adapter]) -> None:
    threads = [threading.Thread(target=a.stop, args=(2.0,)) for a in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _sink_triples(components: list[tuple[type, Any, str, Any]]) -> list[tuple[type, Any, str, Any]]:
    """(class, options, name, (upload rules, tags)) of each sink."""
    return [(cls, options, name, (getattr(entry, "upload", None), getattr(entry, "tags", None)
                                  or None))
            for cls, options, name, entry in components]


def _key_and_url(gw: Any, config: RigConfig) -> tuple[Secret | None, str | None]:
    """The key and URL ``config`` gives Plexus sinks, resolved as at start."""
    from plexus.client import read_user_config

    if gw.receiver is not None:  # the bundled receiver stays (local_receiver is restart-only)
        return gw._api_key, gw.gateway_url
    user = read_user_config()
    key = config.api_key or os.environ.get("PLEXUS_API_KEY") or user.get("api_key")
    url = config.gateway_url or os.environ.get("PLEXUS_GATEWAY_URL") or user.get("gateway_url")
    return (Secret(key) if key else None), url


def _problems_text(path: str, exc: Exception) -> str:
    problems = getattr(exc, "errors", None) or [exc]
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return f"{path}: {count}; the running configuration is unchanged:\n" + \
        "\n".join(f"  {p}" for p in problems)


def _load_rig(path: str) -> tuple[Any, Any]:
    from plexus.cli.common import load_rig

    return load_rig(path)
