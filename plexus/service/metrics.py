"""The opt-in HTTP endpoint: Prometheus metrics at ``/metrics``, health at ``/healthz``.

Turned on by the rig's ``metrics: {listen: 127.0.0.1:9273}``. The text
format comes from prometheus-client (the format has corners, escaping and
types, that are not worth owning), through a custom collector that reads the
gateway's own counters at scrape time (:mod:`plexus.service.figures`): no
second set of counters is kept, and a scrape costs nothing between scrapes.
prometheus-client is imported only here, when the endpoint starts, so
``import plexus`` and a rig without ``metrics:`` never load it.

``/healthz`` answers 200 and ``ok``, or 503 and one reason per line
(:func:`plexus.service.health.problems`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from plexus.errors import ConfigError, PlexusError
from plexus.service.figures import Figures, Snapshot

__all__ = ["MetricsServer", "parse_listen"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9273"
ADAPTER_STATES = ("starting", "connected", "reconnecting", "link_lost", "finished", "stopped",
                  "failed")
LINK_STATES = ("off", "connecting", "up", "waiting", "stopped")


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9273`` for IPv6) as a (host, port) pair.

    Raises:
        ConfigError: not of that form, or a port outside 0..65535.
    """
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port (e.g. {DEFAULT_LISTEN}), got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` from a background thread.

    Parameters:
        figures: where the counters are read.
        listen: ``host:port``; port 0 picks a free one (see :attr:`port`).
        health: returns the reasons the gateway is unhealthy (empty: healthy).

    Raises:
        ConfigError: prometheus-client is not installed.
        PlexusError: the address cannot be listened on (in use...).
    """

    def __init__(self, figures: Figures, listen: str = DEFAULT_LISTEN,
                 health: Callable[[Snapshot], list[str]] | None = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
        except ImportError as exc:
            raise ConfigError("metrics: the Prometheus endpoint needs prometheus-client: "
                              "pip install 'plexus-gateway[metrics]'") from exc
        self.figures = figures
        self.health = health or (lambda _snapshot: [])
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(figures, self.health))
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of the gateway
        host, port = parse_listen(listen)
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:  # not a config error: the port may be free at the next try
            raise PlexusError(f"metrics: cannot listen on {listen}: {exc.strerror or exc}") \
                from exc
        self._server.daemon_threads = True
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread: threading.Thread | None = None
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("metrics: serving on %s:%d, reachable from other machines; the "
                        "endpoint has no authentication", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="plexus-metrics")
        self._thread.start()
        log.info("metrics on %s/metrics, health on %s/healthz", self.url, self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only once started
            self._server.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._server.server_close()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "plexus-gateway"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                self._reply(200, server.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                reasons = server.health(server.figures.snapshot())
                body = "ok\n" if not reasons else "".join(f"{r}\n" for r in reasons)
                self._reply(503 if reasons else 200, body.encode())
            elif path == "/":
                self._reply(200, b"plexus-gateway: /metrics (Prometheus), /healthz\n")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n")

        def _reply(self, code: int, body: bytes,
                   content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


class _Collector:
    """Reads one snapshot per scrape and turns it into metric families."""

    def __init__(self, figures: Figures, health: Callable[[Snapshot], list[str]]) -> None:
        self.figures = figures
        self.health = health

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily as Counter
        from prometheus_client.core import GaugeMetricFamily as Gauge

        snap = self.figures.snapshot()
        info = Gauge("plexus_info", "The gateway: 1, with its version and source id as labels",
                     labels=["version", "source_id"])
        from plexus import __version__

        info.add_metric([__version__, snap.source_id], 1)
        yield info
        yield Gauge("plexus_uptime_seconds", "Seconds since the gateway started",
                    value=snap.uptime)
        yield Gauge("plexus_healthy", "1 when /healthz answers 200, else 0",
                    value=0 if self.health(snap) else 1)
        for key, help_text in (("reloads", "Rig file reloads applied"),
                               ("reload_failures", "Rig file reloads refused (invalid file)")):
            if key in snap.service:
                yield Counter(f"plexus_{key}", help_text, value=snap.service[key])
        yield from _adapter_families(snap, Counter, Gauge)
        yield from _sink_families(snap, Counter, Gauge)
        yield from _link_families(snap, Counter, Gauge)


def _adapter_families(snap: Snapshot, counter: Any, gauge: Any) -> Iterator[Any]:
    labels = ["adapter", "type"]
    state = gauge("plexus_adapter_state", "1 for the adapter's current state",
                  labels=[*labels, "state"])
    points = counter("plexus_adapter_points", "Points the adapter produced", labels=labels)
    errors = counter("plexus_adapter_errors", "Frames, payloads or lines that could not be used, "
                     "plus failures of the link", labels=labels)
    kinds = counter("plexus_adapter_errors_by_kind", "The adapter's error counters, by kind",
                    labels=[*labels, "kind"])
    reconnects = counter("plexus_adapter_reconnects", "Links re-established", labels=labels)
    details = gauge("plexus_adapter_detail", "The adapter's other counters (frames, messages, "
                    "lines...), by name", labels=[*labels, "name"])
    age = gauge("plexus_adapter_last_point_age_seconds", "Seconds since the adapter's last "
                "point", labels=labels)
    for a in snap.adapters:
        key = [a.name, a.type]
        for name in ADAPTER_STATES if a.state in ADAPTER_STATES else (*ADAPTER_STATES, a.state):
            state.add_metric([*key, name], 1 if a.state == name else 0)
        points.add_metric(key, a.points)
        errors.add_metric(key, a.errors)
        reconnects.add_metric(key, a.reconnects)
        for kind, n in sorted(a.error_kinds.items()):
            kinds.add_metric([*key, kind], n)
        for name, value in sorted(a.details.items()):
            details.add_metric([*key, name], value)
        if a.last_point_age is not None:
            age.add_metric(key, a.last_point_age)
    yield from (state, points, errors, kinds, reconnects, details, age)


def _sink_families(snap: Snapshot, counter: Any, gauge: Any) -> Iterator[Any]:
    labels = ["sink"]
    fams = {
        "buffered": gauge("plexus_sink_buffered_points", "Points waiting for the sink "
                          "(the request in flight included)", labels=labels),
        "bytes": gauge("plexus_sink_buffered_bytes", "Bytes the persistent buffer holds",
                       labels=labels),
        "delivered": counter("plexus_sink_delivered_points", "Points the sink accepted",
                             labels=labels),
        "dropped": counter("plexus_sink_dropped_points", "Points that will never be delivered, "
                           "by reason (with the persistent buffer: since the buffer file was "
                           "made)", labels=[*labels, "reason"]),
        "rejected": counter("plexus_sink_rejected_points", "Points the sink refused for good "
                            "(with the persistent buffer: since the buffer file was made)",
                            labels=labels),
        "retries": counter("plexus_sink_retries", "Attempts that repeated a failed one",
                           labels=labels),
        "failures": counter("plexus_sink_failed_requests", "Failed attempts", labels=labels),
        "requests": counter("plexus_sink_requests", "Accepted requests", labels=labels),
        "lag": gauge("plexus_sink_upload_lag_seconds", "About how long the oldest waiting "
                     "point has waited", labels=labels),
        "age": gauge("plexus_sink_last_success_age_seconds", "Seconds since the last accepted "
                     "request (absent before the first)", labels=labels),
        "last": gauge("plexus_sink_last_success_timestamp_seconds", "Unix time of the last "
                      "accepted request (0 before the first)", labels=labels),
        "delivering": gauge("plexus_sink_delivering", "1 while the last attempt succeeded",
                            labels=labels),
        "open": gauge("plexus_sink_open", "1 once the sink has opened (0 while its opening "
                      "is retried)", labels=labels),
        "auth": gauge("plexus_sink_auth_refused", "1 while the platform refuses the key",
                      labels=labels),
        "waited": counter("plexus_sink_backpressure_waits", "Times a source waited for room "
                          "in the buffer", labels=labels),
        "spilled": counter("plexus_sink_spilled_points", "Points kept in memory because the "
                           "disk was full", labels=labels),
        "torn": counter("plexus_sink_torn_records", "Buffer segments found cut short at "
                        "start (a crash or power cut)", labels=labels),
        "health": counter("plexus_sink_health_points", "The gateway's own health points "
                          "delivered (never counted as delivered)", labels=labels),
    }
    for s in snap.sinks:
        key = [s.name]
        fams["buffered"].add_metric(key, s.buffered)
        if s.buffered_bytes is not None:
            fams["bytes"].add_metric(key, s.buffered_bytes)
        fams["delivered"].add_metric(key, s.delivered)
        for reason, n in sorted(s.dropped.items()):
            fams["dropped"].add_metric([*key, reason], n)
        fams["rejected"].add_metric(key, s.rejected)
        fams["retries"].add_metric(key, s.retries)
        fams["failures"].add_metric(key, s.failures)
        fams["requests"].add_metric(key, s.requests)
        fams["lag"].add_metric(key, s.upload_lag)
        age = s.last_success_age(snap.taken_at)
        if age is not None:
            fams["age"].add_metric(key, age)
        fams["last"].add_metric(key, s.last_success or 0.0)
        fams["delivering"].add_metric(key, 1 if s.delivering else 0)
        fams["open"].add_metric(key, 0 if s.opening else 1)
        fams["auth"].add_metric(key, 1 if s.auth_refused else 0)
        fams["waited"].add_metric(key, s.waited)
        if s.persistent:
            fams["spilled"].add_metric(key, s.spilled)
            fams["torn"].add_metric(key, s.torn_records)
        fams["health"].add_metric(key, s.health_points)
    yield from fams.values()


def _link_families(snap: Snapshot, counter: Any, gauge: Any) -> Iterator[Any]:
    link = snap.link
    if link is not None:
        state = gauge("plexus_link_state", "1 for the device link's current state",
                      labels=["state"])
        for name in LINK_STATES if link["state"] in LINK_STATES else (*LINK_STATES,
                                                                       link["state"]):
            state.add_metric([name], 1 if link["state"] == name else 0)
        yield state
        yield gauge("plexus_link_up", "1 while the device link is authenticated",
                    value=1 if link["up"] else 0)
        for key, help_text in (("connections", "Device link connections made"),
                               ("reconnects", "Device link reconnects"),
                               ("frames_in", "Frames received on the device link"),
                               ("frames_out", "Frames sent on the device link"),
                               ("server_errors", "Error frames from the platform")):
            yield counter(f"plexus_link_{key}", help_text, value=link[key])
        if link["clock_offset"] is not None:
            yield gauge("plexus_link_clock_offset_seconds", "Seconds to add to this computer's "
                        "clock to match the platform's", value=link["clock_offset"])
    if snap.commands is not None:
        counts = dict(snap.commands)
        yield counter("plexus_command_runs", "Remote command runs started",
                      value=counts.pop("runs", 0))
        outcomes = counter("plexus_command_outcomes", "Remote command runs ended, by outcome "
                           "(succeeded, failed; duplicates: repeats answered from memory)",
                           labels=["outcome"])
        for outcome, n in sorted(counts.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
