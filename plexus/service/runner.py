"""The service around a running gateway: systemd, metrics, the agent, log events, reload.

``plexus-gateway`` builds a :class:`Service` beside its :class:`~plexus.gateway.Gateway`
and calls :meth:`Service.tick` from its main loop, about once a second. That
one call samples the counters (for the upload lag), queues the agent's report
when it is due, starts a reload that SIGHUP asked for, updates systemd's
status line and pings the watchdog, but only while nothing is stuck
(:func:`plexus.service.health.stuck`). A main loop that dies or hangs
pings nothing, so systemd restarts the gateway either way.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from plexus.config import RigConfig
from plexus.service import health
from plexus.service.agent import AgentReporter
from plexus.service.figures import Figures, Snapshot
from plexus.service.notify import Notifier
from plexus.service.reload import Reloader, ReloadRefused

__all__ = ["Service"]

log = logging.getLogger("plexus.service")

#: Seconds between STATUS= updates to systemd.
STATUS_EVERY = 10.0
#: /healthz reports a main loop that has not ticked for this long.
LOOP_STALLED_AFTER = 30.0


class Service:
    """Everything a gateway needs to run unattended; see the module docstring.

    Parameters:
        gateway: a built gateway (started by the caller, after :meth:`open`).
        notifier: how to tell systemd (default: from the environment).
    """

    def __init__(self, gateway: Any, notifier: Notifier | None = None) -> None:
        self.gateway = gateway
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self.figures = Figures(
            gateway.source_id,
            adapters=lambda: [a for a, _ in gateway.adapters],
            lanes=lambda: list(gateway.pipeline.lanes),
            link=lambda: getattr(gateway.commands, "link", None),
            commands=lambda: getattr(gateway.commands, "center", None),
            service=lambda: {"reloads": self.reloader.reloads,
                             "reload_failures": self.reloader.failures},
        )
        self.metrics: Any = None  # plexus.service.metrics.MetricsServer
        self._metrics_listen: str | None = None
        self.agent: AgentReporter | None = None
        self.log_events: Any = None  # plexus.logging.PlexusHandler
        self.reloader = Reloader(gateway, on_settings=self._apply_settings)
        self.last_reload: Any = None  # the last ReloadResult, or the ReloadRefused
        self._reload_wanted = threading.Event()
        self._reload_thread: threading.Thread | None = None
        self._last_tick = time.monotonic()
        self._next_status = 0.0
        self._stuck_logged: tuple[str, ...] = ()

    # Start and stop --------------------------------------------------------------
    def open(self) -> None:
        """Bind the metrics endpoint (before the gateway starts, so a busy port
        fails the start; it answers once the gateway is up). Raises ConfigError
        (prometheus-client missing) or PlexusError (the address cannot be
        listened on)."""
        self._apply_metrics(self.gateway.config, serve=False)

    def started(self) -> None:
        """The gateway's adapters and sinks are up: the agent, log events, READY=1."""
        self.figures.started_at = self.gateway.started_at or time.time()
        if self.metrics is not None:
            self.metrics.start()
        self._apply_agent(self.gateway.config)
        self._apply_log_events(self.gateway.config)
        self.tick()
        self.notifier.ready(self.status_line(self.figures.snapshot()))

    def stopping(self) -> None:
        """Shutdown begins: STOPPING=1, time to deliver, the agent's last report."""
        self.notifier.stopping("stopping: delivering what is buffered")
        self.notifier.extend_timeout(self.gateway.config.grace_period + 15.0)
        if self.agent is not None:
            self.agent.report()
        self._detach_log_events()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        self.notifier.close()

    # The main loop's tick ------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        self._last_tick = now
        self.figures.tick()
        if self.agent is not None:
            self.agent.poll(now)
        if self._reload_wanted.is_set() and not self.reloading:
            self._reload_wanted.clear()
            self._reload_thread = threading.Thread(target=self._reload, name="plexus-reload",
                                                   daemon=True)
            self._reload_thread.start()
        snapshot: Snapshot | None = None
        if self.notifier.watchdog_due():
            snapshot = self.figures.snapshot()
            reasons = tuple(health.stuck(snapshot))
            if not reasons:
                self.notifier.watchdog()
            elif reasons != self._stuck_logged:
                log.error("not pinging the systemd watchdog: %s", "; ".join(reasons))
            self._stuck_logged = reasons
        if self.notifier.enabled and now >= self._next_status and not self.reloading:
            self._next_status = now + STATUS_EVERY
            self.notifier.status(self.status_line(snapshot or self.figures.snapshot()))

    def tick_seconds(self, wanted: float) -> float:
        """The main loop's tick: ``wanted``, or shorter so every watchdog ping is on time."""
        interval = self.notifier.watchdog_interval
        return wanted if interval is None else max(0.05, min(wanted, interval / 2))

    def problems(self, snapshot: Snapshot) -> list[str]:
        """Why the gateway is unhealthy (``/healthz``); empty when it is not."""
        snapshot.service["main_loop_age"] = time.monotonic() - self._last_tick
        return health.problems(snapshot, stale_after=self.gateway.config.metrics.stale_after,
                               loop_stalled_after=LOOP_STALLED_AFTER)

    @staticmethod
    def status_line(snap: Snapshot) -> str:
        """One line for ``systemctl status``."""
        up = sum(1 for a in snap.adapters if a.state == "connected")
        failed = sum(1 for a in snap.adapters if a.state == "failed")
        parts = [f"{up}/{len(snap.adapters)} adapters connected"
                 + (f", {failed} failed" if failed else "")]
        for s in snap.sinks:
            lost = sum(s.dropped.values()) + s.rejected
            parts.append(f"{s.name}: {s.delivered} delivered, {s.buffered} buffered"
                         + (f", {lost} lost" if lost else "")
                         + ("" if s.delivering else " (failing)"))
        return "; ".join(parts)

    # Reload ------------------------------------------------------------------------------
    def request_reload(self) -> None:
        """Ask for a reload at the next tick (safe from a signal handler)."""
        self._reload_wanted.set()

    @property
    def reloading(self) -> bool:
        return self._reload_thread is not None and self._reload_thread.is_alive()

    def _reload(self) -> None:
        path = self.gateway.config.path
        log.info("reloading %s", path)
        self.notifier.reloading(f"reloading {path}")
        try:
            result = self.reloader.reload()
        except ReloadRefused as exc:
            self.last_reload = exc
            log.error("reload refused: %s", exc)
        except Exception as exc:  # never let a reload take the gateway down
            self.last_reload = exc
            log.exception("reload failed: %s", exc)
        else:
            self.last_reload = result
            log.info("reloaded %s in %.2f s: %s", path, result.seconds, result.plan.describe())
            for problem in result.problems:
                log.error("reload: %s", problem)
        finally:
            self.notifier.ready(self.status_line(self.figures.snapshot()))

    def wait_reloaded(self, timeout: float = 30.0) -> bool:
        """Block until no reload runs (for tests and the shutdown)."""
        thread = self._reload_thread
        if thread is not None:
            thread.join(timeout)
        return not self.reloading

    # Settings that apply at once --------------------------------------------------
    def _apply_settings(self, config: RigConfig, changed: list[str]) -> None:
        if "log_level" in changed:
            logging.getLogger().setLevel(config.log_level.upper())
        if "metrics" in changed:
            self._apply_metrics(config)
        self._apply_agent(config)  # new sinks get a side queue even when nothing else changed
        if "log_events" in changed or "log_events_per_minute" in changed:
            self._apply_log_events(config)

    def _apply_metrics(self, config: RigConfig, serve: bool = True) -> None:
        listen = config.metrics.listen
        if self.metrics is not None and (listen is None or listen != self._metrics_listen):
            self.metrics.stop()
            self.metrics = None
        if listen is not None and self.metrics is None:
            from plexus.service.metrics import MetricsServer

            self.metrics = MetricsServer(self.figures, listen, health=self.problems)
            self._metrics_listen = listen
            if serve:
                self.metrics.start()

    def _apply_agent(self, config: RigConfig) -> None:
        settings = config.agent_metrics
        if not settings.enabled:
            if self.agent is not None:
                for lane in self.gateway.pipeline.lanes:
                    lane.uploader.side = None
                self.agent = None
            return
        if self.agent is None or self.agent.interval != settings.interval or \
                self.agent.sinks != (None if settings.sinks is None else set(settings.sinks)):
            self.agent = AgentReporter(self.gateway.pipeline, self.figures,
                                       interval=settings.interval, sinks=settings.sinks)
        self.agent.attach()

    def _apply_log_events(self, config: RigConfig) -> None:
        self._detach_log_events()
        if config.log_events is None:
            return
        from plexus.logging import PlexusHandler

        key = self.gateway.api_key
        self.log_events = PlexusHandler(self.gateway.pipeline, config.log_events,
                                        per_minute=config.log_events_per_minute,
                                        secret=key.reveal() if key is not None else None)
        logging.getLogger().addHandler(self.log_events)

    def _detach_log_events(self) -> None:
        if self.log_events is not None:
            logging.getLogger().removeHandler(self.log_events)
            self.log_events.close()
            self.log_events = None
