"""The gateway's own settings: every top-level key of a rig file, in one place.

``adapters`` and ``sinks`` are read by :mod:`plexus.config.rig`; each entry's
options are declared by its adapter or sink class, in its own module. A new
top-level section (``commands:``, say) is a field here, with its own model.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from plexus.config.options import OptionsModel, option
from plexus.control import CommandsConfig

__all__ = [
    "AgentMetricsConfig",
    "BatchConfig",
    "BufferConfig",
    "ClockConfig",
    "GatewaySettings",
    "LocalReceiverConfig",
    "MetricsConfig",
    "RetrySettings",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class BufferConfig(OptionsModel):
    """Where points wait until a sink has acknowledged them."""

    type: Literal["memory", "sqlite"] = option(
        "memory", help="'memory' (a ring, lost on exit) or 'sqlite' (survives restarts). "
                       "Default: memory.")
    path: str | None = option(
        None, help="The SQLite file (relative to the rig file). Default: null, chosen by the "
                   "gateway (~/.plexus/buffer/<source_id>.db).", path=True)
    max_points: Annotated[int, Field(ge=1)] | None = option(
        None, help="Cap on buffered points (see when_full). Default: null, the buffer's own "
                   "(10,000 in memory; in sqlite no practical limit, max_bytes governs).")
    max_bytes: Annotated[int, Field(ge=1)] | None = option(
        None, help="sqlite only: cap on stored bytes (compressed, about 7 bytes a point). "
                   "Default: null, 2 GiB.")
    when_full: Literal["block", "drop_oldest"] = option(
        "block", help="What a full buffer does: 'block' makes sources wait for room while the "
                      "sink delivers, and drops the oldest points only while delivery fails; "
                      "'drop_oldest' never waits. Default: block.")
    sync_interval: float = option(
        1.0, help="sqlite only: seconds between fsyncs, the most a power cut can lose. "
                  "Default: 1.0.", gt=0)


class BatchConfig(OptionsModel):
    """How buffered points are grouped into uploads."""

    size: int = option(1000, help="This many waiting points start an upload at once. "
                                  "Default: 1000.", ge=1)
    interval: float = option(1.0, help="Otherwise upload every this many seconds. "
                                       "Default: 1.0.", gt=0)
    max_points: int = option(10000, help="Most points in one request (the platform accepts up "
                                         "to 10,000). Default: 10000.", ge=1, le=10000)


class RetrySettings(OptionsModel):
    """Backoff for a batch that failed to send: base, 2*base, 4*base... +-25%."""

    retries: int = option(3, help="Retries of a failed batch before it waits for the next "
                                  "send. Default: 3.", ge=0)
    base: float = option(1.0, help="Seconds before the first retry, doubled each time. "
                                   "Default: 1.0.", gt=0)
    max_delay: float = option(30.0, help="Longest wait between retries, in seconds. "
                                         "Default: 30.0.", gt=0)


class LocalReceiverConfig(OptionsModel):
    """A Plexus-compatible receiver started inside the gateway (demos, bench rigs)."""

    enabled: bool = option(False, help="Start the bundled receiver (plexus.testing) and send "
                                       "to it instead of the platform. Default: false.")
    port: int = option(0, help="Its port on 127.0.0.1; 0 picks a free one. Default: 0.",
                       ge=0, le=65535)


class MetricsConfig(OptionsModel):
    """The Prometheus and health endpoint (docs/operations.md)."""

    listen: str | None = option(
        None, help="host:port to serve /metrics and /healthz on, e.g. 127.0.0.1:9273 (keep it "
                   "on loopback unless a firewall guards it: there is no authentication). "
                   "Default: null, no endpoint.")
    stale_after: float = option(
        300.0, help="/healthz reports a sink that has delivered nothing for this many seconds "
                    "while points wait. Default: 300.0.", gt=0)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        from plexus.errors import ConfigError
        from plexus.service.metrics import parse_listen

        if value is not None:
            try:
                parse_listen(value)
            except ConfigError as exc:
                raise PydanticCustomError("listen", "{reason}", {"reason": str(exc)}) from None
        return value


class AgentMetricsConfig(OptionsModel):
    """The gateway's own health, sent as points (plexus.agent.*; docs/operations.md)."""

    enabled: bool = option(True, help="Send plexus.agent.* points (drops, rejections, "
                                      "backlog, lag, adapter errors). Default: true.")
    interval: float = option(60.0, help="Seconds between reports. Default: 60.0.", ge=1)
    sinks: list[str] | None = option(
        None, help="Names of the sinks that get the reports. Default: null, every sink.")
class ClockConfig(OptionsModel):
    """When the system clock may stamp points, and what stamps them when it may not
    (docs/time.md)."""

    not_before: str | None = option(
        None, help="A day (YYYY-MM-DD, UTC): a system clock showing an earlier time is not "
                   "trusted. Default: null, the day this package was built (plexus-gateway "
                   "--version); 1970-01-01 turns the check off.")
    require_sync: bool = option(
        False, help="Trust the system clock only once the kernel says it is synchronized "
                    "(NTP) or a time reference agrees with it: for boards that restore the "
                    "last shutdown's time at boot (fake-hwclock). Default: false.")
    tolerance: float = option(
        2.0, help="Seconds a time reference (the platform, a GPS) may disagree with a system "
                  "clock that is not synchronized before the reference stamps instead. "
                  "Default: 2.0.", ge=0)
    step_threshold: float = option(
        0.5, help="A jump of the system clock larger than this many seconds is logged and "
                  "counted as a step. Default: 0.5.", gt=0)
    hold_max_points: int = option(
        100_000, help="Most points that wait for a trustworthy time; beyond it the oldest are "
                      "dropped (counted). Default: 100000.", ge=1)
    platform_time: bool = option(
        True, help="Use the platform's time (the Date header of its answers, the device "
                   "link's server time) as a time reference. Default: true.")

    @field_validator("not_before", mode="before")
    @classmethod
    def _a_day(cls, value: object) -> object:
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, date):  # YAML reads an unquoted 2027-01-31 as a date
            return value.isoformat()
        if isinstance(value, str):
            try:
                date.fromisoformat(value)
            except ValueError:
                raise PydanticCustomError(
                    "not_before", "must be a day as YYYY-MM-DD, got {value}",
                    {"value": repr(value)}) from None
        return value

    @property
    def not_before_s(self) -> float | None:
        """``not_before`` as Unix seconds (midnight UTC), or None for the build date."""
        if self.not_before is None:
            return None
        day = date.fromisoformat(self.not_before)
        return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


class GatewaySettings(OptionsModel):
    """The rig file's top-level settings (everything but ``adapters`` and ``sinks``)."""

    source_id: str | None = option(
        None, help="This gateway's id on the platform (lower-case letters, digits, '.', '_', '-'). "
                   "Default: null, then PLEXUS_SOURCE_ID, ~/.plexus/config.json, or a "
                   "generated id.")
    api_key: str | None = option(
        None, help="The platform API key, normally ${PLEXUS_API_KEY}. Default: null, then "
                   "PLEXUS_API_KEY or ~/.plexus/config.json.", secret=True)
    gateway_url: str | None = option(
        None, help="Base URL of the platform. Default: null, then PLEXUS_GATEWAY_URL, "
                   "~/.plexus/config.json, or https://gateway.plexus.company.")
    tags: dict[str, str] = option(default_factory=dict,
                                  help="Tags added to every point. Default: {}.")
    buffer: BufferConfig = option(default_factory=BufferConfig, help="Buffer settings.")
    batch: BatchConfig = option(default_factory=BatchConfig, help="Batch settings.")
    retry: RetrySettings = option(default_factory=RetrySettings, help="Retry settings.")
    session: str | None = option(
        None, help="A session id tagging every point of the whole run. Default: null "
                   "(no session).")
    session_tags: dict[str, str] = option(default_factory=dict,
                                          help="Tags of that session. Default: {}.")
    grace_period: float = option(
        5.0, help="Seconds allowed at shutdown to deliver what is buffered. Default: 5.0.", ge=0)
    log_level: str = option("info", help="debug, info, warning, error or critical. "
                                         "Default: info.")
    status_interval: float = option(10.0, help="Seconds between status reports. Default: 10.0.",
                                    gt=0)
    verify_tls: bool = option(True, help="Verify the platform's TLS certificate. Default: true.")
    timeout: float = option(10.0, help="Seconds allowed per HTTP request. Default: 10.0.", gt=0)
    local_receiver: LocalReceiverConfig = option(
        default_factory=LocalReceiverConfig,
        help="A local receiver for running without a Plexus account (demo).")
    commands: CommandsConfig = option(
        default_factory=CommandsConfig,
        help="Remote commands from the dashboard (docs/commands.md).")
    metrics: MetricsConfig = option(
        default_factory=MetricsConfig,
        help="The Prometheus (/metrics) and health (/healthz) endpoint; off by default.")
    agent_metrics: AgentMetricsConfig = option(
        default_factory=AgentMetricsConfig,
        help="The gateway's own health sent as plexus.agent.* points; on by default.")
    log_events: str | None = option(
        None, help="Send log records at or above this level (debug ... critical) as events "
                   "named log (tagged level and logger), rate-limited. Default: null, none.")
    log_events_per_minute: int = option(
        10, help="Most log events sent a minute (bursts of up to twice that); the rest are "
                 "counted and summed up in the next one. Default: 10.", ge=1)
    clock: ClockConfig = option(
        default_factory=ClockConfig,
        help="Clock safety: when the system clock may stamp points (docs/time.md).")

    @field_validator("source_id")
    @classmethod
    def _valid_source_id(cls, value: str | None) -> str | None:
        from plexus.errors import ValidationError
        from plexus.point import validate_source_id

        if value is not None:
            try:
                validate_source_id(value)
            except ValidationError as exc:
                raise PydanticCustomError("source_id", "{reason}", {"reason": str(exc)}) from None
        return value

    @field_validator("log_level", "log_events")
    @classmethod
    def _known_level(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.lower() not in LOG_LEVELS:
            raise PydanticCustomError(
                "log_level", "must be one of {choices}, got {value}",
                {"choices": ", ".join(LOG_LEVELS), "value": repr(value)})
        return value.lower()
