"""MQTT source: subscribe to topics on a broker and turn messages into points.

Topic to metric
    By default the topic's ``/`` become ``.`` (``sensors/engine/rpm`` becomes
    ``sensors.engine.rpm``; empty levels are dropped). ``metric_template``
    builds the name from the topic's levels instead, numbered from 0 with
    :meth:`str.format` fields (``"{1}.{3}"``; ``{topic}`` is the whole dotted
    topic). ``tag_segments`` turns levels into tags (``{vehicle: 1}``; negative
    indices count from the end). ``prefix`` is put in front of every metric.

Payload to value(s)
    ``auto`` (the default) reads JSON when the payload is JSON (numbers,
    ``true``/``false``, objects, arrays, quoted strings), otherwise a plain
    number, ``true``/``false`` in any case, or else a plain string. A payload
    that starts like a JSON object or array but does not parse, bytes that are
    not UTF-8, a ``nan``/``inf`` and a JSON ``null`` are bad payloads: counted,
    logged at a limited rate, and dropped. Empty payloads (a retained message
    being deleted) are ignored.

    JSON objects are flattened to ``metric.key.subkey``; null members are
    skipped. Arrays are flattened by index (``metric.0``, ``metric.1``) with
    ``arrays: index``, or kept whole as one event value with ``arrays: value``.

    ``value_path`` (dotted, list indices as numbers: ``data.temps.0``) picks
    the part of a JSON document to use; ``timestamp_path`` picks the reading's
    time: Unix seconds, milliseconds, microseconds or nanoseconds (told apart
    by magnitude: below 1e11 is seconds, below 1e14 milliseconds, below 1e17
    microseconds, above that nanoseconds), a numeric string, or an ISO 8601
    string (UTC when it has no offset). The timestamp leaf itself is not
    emitted as a metric. A missing or unreadable timestamp is counted in
    ``bad_timestamps`` and the reading keeps its receive time.

Acknowledgement and kept sessions
    A QoS 1 message is acknowledged to the broker (PUBACK) only after its
    points are in the buffer; a message whose points could not be buffered
    (the pipeline is closing, the disk is full) is left unacknowledged, and
    the broker sends it again on the session's next connection. With
    ``clean_start: false`` and a fixed ``client_id`` the broker keeps the
    session for ``session_expiry`` seconds (MQTT 5) and queues QoS 1 messages
    for it while the gateway is away, so with the persistent buffer a gateway
    that is killed and restarted loses nothing the broker held for it. A
    message the gateway had received but not acknowledged when it died comes
    again: delivery is at least once, never exactly once.

Shared subscriptions (MQTT 5)
    ``share_group: depot`` subscribes every topic as ``$share/depot/<topic>``:
    the broker hands each message to one member of the group, so N gateways
    split one feed. Each member needs its own ``client_id``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import orjson
from annotated_types import Ge, Interval

from plexus.adapters.base import Adapter, AdapterContext, describe_error, require
from plexus.adapters.lineformats import LineError, timestamp_seconds
from plexus.errors import AdapterError, BufferingError, InvalidOptions, PlexusError
from plexus.optioncheck import declared_problems

__all__ = ["MqttAdapter", "MqttOptions", "TopicOption", "set_login_and_tls"]

log = logging.getLogger(__name__)

# Topic -> (metric, tags) is computed once per distinct topic; the cache is
# cleared when full so a broker with endless unique topics cannot grow it forever.
_ROUTE_CACHE_SIZE = 4096
# Bytes a JSON document can start with (leading white space included).
_JSON_FIRST_BYTES = frozenset(b'{["-0123456789tfn \t\r\n')


@dataclass
class TopicOption:
    """One subscription: an MQTT topic filter and the QoS to subscribe with."""

    topic: str = field(metadata={"help": "topic filter; '+' matches one level, '#' the rest"})
    qos: Literal[0, 1, 2] = field(default=0, metadata={"help": "subscription QoS: 0, 1 or 2"})


@dataclass
class MqttOptions:
    """Options of the ``mqtt`` adapter (see the module docstring for the mapping rules)."""

    topics: list[TopicOption | str] = field(
        metadata={"help": "topic filters to subscribe to: 'a/b/#' (QoS 0) or {topic, qos}"}
    )
    host: str = field(default="localhost", metadata={"help": "broker host name or address"})
    port: Annotated[int, Interval(ge=1, le=65535)] = field(default=1883, metadata={"help": "broker port (8883 is usual for TLS)"})
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_certs: str | None = field(
        default=None, metadata={"help": "CA bundle (PEM) to verify the broker; None: system CAs",
                                "path": True}
    )
    certfile: str | None = field(default=None, metadata={"help": "client certificate (PEM)",
                                                         "path": True})
    keyfile: str | None = field(default=None, metadata={"help": "client private key (PEM)",
                                                        "path": True})
    tls_insecure: bool = field(
        default=False,
        metadata={"help": "skip the broker host name check (logs a warning; testing only)"},
    )
    username: str | None = field(default=None, metadata={"help": "broker user name"})
    password: str | None = field(
        default=None, repr=False,
        metadata={"help": "broker password; never logged", "secret": True}
    )
    client_id: str | None = field(
        default=None,
        metadata={"help": "MQTT client id; None: plexus-<random hex>, new each start"},
    )
    protocol: Literal["5", "3.1.1"] = field(
        default="3.1.1", metadata={"help": "MQTT version: '3.1.1' (any broker) or '5'"}
    )
    keepalive: Annotated[int, Ge(1)] = field(default=60, metadata={"help": "keepalive interval, seconds"})
    clean_start: bool = field(
        default=True,
        metadata={"help": "start a fresh session on every connect; false keeps the "
                  "broker-side session (needs a fixed client_id)"},
    )
    session_expiry: Annotated[int, Interval(ge=0, le=0xFFFFFFFF)] = field(
        default=3600,
        metadata={"help": "MQTT 5 with clean_start false: seconds the broker keeps the session "
                  "(and queues QoS 1 messages for it) while the gateway is away"},
    )
    share_group: str | None = field(
        default=None,
        metadata={"help": "MQTT 5 shared subscription group: every topic is subscribed as "
                  "$share/<group>/<topic>, so gateways in one group split the feed"},
    )
    metric_template: str | None = field(
        default=None,
        metadata={"help": "metric from topic levels, 0-based: '{1}.{3}'; {topic} is the whole "
                  "topic with '.'; None: the topic with '/' replaced by '.'"},
    )
    tag_segments: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "tag name -> topic level index (negative counts from the end)"},
    )
    prefix: str | None = field(
        default=None, metadata={"help": "prepended to every metric with a '.'"}
    )
    payload_format: Literal["auto", "json", "number", "string"] = field(
        default="auto", metadata={"help": "how payloads are read: auto, json, number, string"}
    )
    value_path: str | None = field(
        default=None, metadata={"help": "dotted path of the value inside a JSON payload"}
    )
    timestamp_path: str | None = field(
        default=None,
        metadata={"help": "dotted path of a Unix timestamp (s/ms/us/ns by magnitude) or "
                  "ISO 8601 string inside a JSON payload; None: receive time"},
    )
    arrays: Literal["index", "value"] = field(
        default="index",
        metadata={"help": "JSON arrays: 'index' emits metric.0, metric.1...; "
                  "'value' emits the whole list as one event value"},
    )
    max_payload_bytes: Annotated[int, Ge(1)] = field(
        default=65536, metadata={"help": "larger payloads are counted as bad and dropped"}
    )

    def __post_init__(self) -> None:
        # Declared limits were checked by the rig loader, each at its line; this holds
        # options built in Python to them too and adds the rules joining several fields.
        problems = declared_problems(self)
        topics = []
        for index, item in enumerate(self.topics):
            topic, problem = _topic_option(index, item)
            topics.append(topic)
            if problem is not None:
                problems.append(problem)
        self.topics = topics  # type: ignore[assignment]
        if not self.topics:
            problems.append(("topics", "must name at least one topic filter"))
        if not self.tls and (self.ca_certs or self.certfile or self.keyfile):
            # Refuse rather than silently sending in plain text what the user meant to encrypt.
            problems.append(("tls", "is false, but ca_certs/certfile/keyfile are set"))
        if self.password is not None and self.username is None:
            problems.append(("password", "is set without a username"))
        if not self.clean_start and not self.client_id:
            # A random id is new on every start, so the kept session would never be found again.
            problems.append(("clean_start", "false needs a fixed client_id (unique per "
                             "gateway), or the broker-side session is never resumed"))
        if self.share_group is not None:
            if self.protocol != "5":
                problems.append(("share_group", "needs protocol: '5' (MQTT 5 shared "
                                 "subscriptions)"))
            if not self.share_group or any(c in self.share_group for c in "/+#"):
                problems.append(("share_group", "must be a non-empty name without '/', '+' "
                                 f"or '#', got {self.share_group!r}"))
        if self.metric_template is not None:
            try:
                self.metric_template.format(*(["x"] * 64), topic="x")
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                problems.append(("metric_template", f"{self.metric_template!r} is invalid: use "
                                 f"0-based level fields like '{{1}}.{{3}}' or {{topic}} ({exc!r})"))
        for tag, index in self.tag_segments.items():
            if not isinstance(index, int) or isinstance(index, bool):
                problems.append((f"tag_segments['{tag}']", "must be an integer level index"))
        if self.payload_format in ("number", "string") and (self.value_path or self.timestamp_path):
            problems.append(("payload_format", f"{self.payload_format!r} has no value_path or "
                             "timestamp_path (they need auto or json)"))
        if problems:
            raise InvalidOptions(problems)


def _topic_option(index: int, item: Any) -> tuple[Any, tuple[str, str] | None]:
    """The subscription, and what is wrong with it (key, message) or None."""
    where = f"topics[{index}]"
    if isinstance(item, str):
        item = TopicOption(item)
    elif isinstance(item, dict):
        try:
            item = TopicOption(**item)
        except TypeError as exc:
            return item, (where, f"must be {{topic, qos}}: {exc}")
    if not isinstance(item, TopicOption):
        return item, (where, "must be a string or {topic, qos}")
    if not isinstance(item.topic, str) or not item.topic:
        return item, (where, "the topic filter must be a non-empty string")
    if item.qos not in (0, 1, 2) or isinstance(item.qos, bool):
        return item, (f"{where}.qos", f"expected one of 0, 1, 2, got {item.qos!r}")
    levels = item.topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return item, (where, f"{item.topic!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            return item, (where, f"{item.topic!r}: '+' must be a whole level")
    return item, None


def set_login_and_tls(client: Any, options: Any, logger: logging.Logger, name: str) -> None:
    """Give a paho client the user name, password and TLS settings of ``options``.

    ``options`` has ``username``, ``password``, ``tls``, ``ca_certs``,
    ``certfile``, ``keyfile`` and ``tls_insecure`` (the MQTT adapter's and
    sink's options both do). Raises OSError/ValueError for unreadable TLS files.
    """
    if options.username is not None:
        client.username_pw_set(options.username, options.password)
    if options.tls:
        client.tls_set(ca_certs=options.ca_certs, certfile=options.certfile,
                       keyfile=options.keyfile)
        if options.tls_insecure:
            logger.warning("%s: tls_insecure is set: the broker's host name is not checked, "
                           "so a man in the middle can read this link", name)
            client.tls_insecure_set(True)


class _Bad(Exception):
    """A payload that cannot be used; the message says why."""


_MISSING = object()


def _split_path(path: str | None) -> tuple[str, ...] | None:
    return tuple(path.split(".")) if path else None


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if type(doc) is dict:
            doc = doc.get(part, _MISSING)
        elif type(doc) is list and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
        if doc is _MISSING:
            return _MISSING
    return doc


class MqttAdapter(Adapter):
    """Subscribe to MQTT topics and emit one point per value in each message.

    paho-mqtt runs its own network thread (``loop_start``), reconnects with
    backoff (1 s doubling to 30 s) after a lost link or a refused connection,
    and the adapter subscribes again on every connection. ``start()`` never
    blocks on the network: a broker that is down at start is retried in the
    background.

    Health counters (``health().extra``): ``messages`` received, ``bad_payloads``
    dropped, ``bad_timestamps`` (reading kept with its receive time),
    ``reconnects`` (links re-established after the first), ``connect_failures``,
    ``subscriptions`` (topic filters granted on the current connection).

    Parameters:
        options: an :class:`MqttOptions`.
        name: the adapter's name in logs and status.

    Raises:
        AdapterError: from :meth:`start` when paho-mqtt is missing or the TLS
            files cannot be loaded.
    """

    type_name: ClassVar[str] = "mqtt"
    extra: ClassVar[str | None] = "mqtt"
    Options: ClassVar[type] = MqttOptions

    @property
    def acknowledges_upstream(self) -> bool:
        """True when the broker forgets a message once this adapter acknowledged it.

        Then only a persistent buffer keeps such a message through a crash.
        """
        return not self.options.clean_start and any(q > 0 for _t, q in self._topics)

    def __init__(self, options: MqttOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: MqttOptions = options
        self.client_id = options.client_id or f"plexus-{secrets.token_hex(6)}"
        self.messages = 0
        self.bad_payloads = 0
        self.bad_timestamps = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.subscriptions = 0
        self._connections = 0
        self._stopping = False
        self._client: Any = None
        self._routes: dict[str, tuple[str, dict[str, str] | None] | str] = {}
        self._value_path = _split_path(options.value_path)
        self._timestamp_path = _split_path(options.timestamp_path)
        # The timestamp leaf, relative to the flattened part, is left out of the metrics.
        self._skip_path: tuple[str, ...] | None = None
        if self._timestamp_path is not None:
            vp = self._value_path or ()
            if self._timestamp_path[: len(vp)] == vp and len(self._timestamp_path) > len(vp):
                self._skip_path = self._timestamp_path[len(vp):]
        self._index_arrays = options.arrays == "index"
        share = f"$share/{options.share_group}/" if options.share_group else ""
        self._topics = [(share + t.topic, t.qos) for t in options.topics
                        if isinstance(t, TopicOption)]
        self.unacked = 0  # QoS 1/2 messages left unacknowledged because buffering failed
        self._buffering_failed = False

    def __repr__(self) -> str:
        o = self.options
        return f"MqttAdapter(name={self.name!r}, broker={o.host}:{o.port}, state={self.state!r})"

    # Lifecycle -----------------------------------------------------------
    def start(self, ctx: AdapterContext) -> None:
        super().start(ctx)
        mqtt = require("paho.mqtt.client", "mqtt")
        self._stopping = False
        client = self._make_client(mqtt)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._warn_about_delivery()
        # connect_async only records the target: the first attempt happens in
        # paho's thread, which retries it, so a broker that is down never fails start().
        client.connect_async(self.options.host, self.options.port, **self._connect_kwargs())
        self._client = client
        self.state = "reconnecting"
        client.loop_start()

    def preflight(self) -> list[str]:
        o = self.options
        problems = []
        for key in ("ca_certs", "certfile", "keyfile"):
            path = getattr(o, key)
            if path is not None and not os.path.isfile(path):
                problems.append(f"{key}: file not found: {path}")
            elif path is not None and not os.access(path, os.R_OK):
                problems.append(f"{key}: cannot read {path} (permission denied)")
        return problems

    def preflight_online(self, timeout: float) -> list[str]:
        mqtt = require("paho.mqtt.client", "mqtt")
        o = self.options
        answer: list[Any] = []
        try:
            client = self._make_client(mqtt)
        except AdapterError as exc:
            return [str(exc)]
        client.on_connect = lambda _c, _u, _f, reason, _p=None: answer.append(reason)
        where = f"the broker at {o.host}:{o.port}"
        try:
            client.connect(o.host, o.port, **self._connect_kwargs())
        except Exception as exc:  # refused, unknown host, TLS handshake...
            return [f"cannot connect to {where}: {describe_error(exc)}"]
        deadline = time.monotonic() + timeout
        try:
            while not answer and time.monotonic() < deadline:
                client.loop(timeout=0.1)
        finally:
            client.disconnect()
        if not answer:
            return [f"{where} did not answer within {timeout:g} s"]
        if answer[0].is_failure:
            return [f"{where} refused the connection: {answer[0]}"]
        return []

    def _connect_kwargs(self) -> dict[str, Any]:
        o = self.options
        kwargs: dict[str, Any] = {"keepalive": o.keepalive}
        if o.protocol == "5":
            kwargs["clean_start"] = o.clean_start
            if not o.clean_start:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = o.session_expiry
                kwargs["properties"] = properties
        return kwargs

    def _make_client(self, mqtt: Any) -> Any:
        o = self.options
        v5 = o.protocol == "5"
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 5 takes clean_start at connect; 3.1.1 takes clean_session here.
            clean_session=None if v5 else o.clean_start,
            reconnect_on_failure=True,
            # A QoS 1 message is acknowledged only once its points are in the buffer
            # (see _on_message), so a gateway killed before that gets it again.
            manual_ack=True,
        )
        try:
            set_login_and_tls(client, o, self._log, self.name)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot load the TLS files: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client

    def _warn_about_delivery(self) -> None:
        o = self.options
        qos = {q for _topic, q in self._topics}
        if o.share_group and 0 in qos:
            self._log.warning(
                "%s: share_group with QoS 0 topics: those messages are sent once and lost if "
                "this gateway dies before buffering them; subscribe with qos: 1", self.name)
        if not o.clean_start and 2 in qos:
            self._log.warning(
                "%s: QoS 2 with a kept session: the client confirms receipt (PUBREC) before "
                "the message is buffered, so a kill at that moment loses it; qos: 1 is "
                "at-least-once across kills", self.name)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception as exc:  # closing a broken link must not block shutdown
                self._log.debug("%s: disconnect failed: %s", self.name, exc)
            # loop_stop() joins paho's thread without a timeout; joining it from a
            # helper thread keeps stop() within ``timeout`` if a connect attempt hangs.
            stopper = threading.Thread(
                target=client.loop_stop, name=f"plexus-stop:{self.name}", daemon=True
            )
            stopper.start()
            stopper.join(timeout)
            if stopper.is_alive():
                self._log.warning("%s: MQTT thread did not stop within %.1fs", self.name, timeout)
        self.subscriptions = 0
        self.state = "stopped"

    def health_extra(self) -> dict[str, Any]:
        return {
            "broker": f"{self.options.host}:{self.options.port}",
            "client_id": self.client_id,
            "messages": self.messages,
            "bad_payloads": self.bad_payloads,
            "bad_timestamps": self.bad_timestamps,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "subscriptions": self.subscriptions,
            "unacked": self.unacked,
        }

    # paho callbacks (all run in paho's network thread) --------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            # A refusal (bad credentials, not authorised): paho retries with backoff.
            self.connect_failures += 1
            self.state = "reconnecting"
            self.record_error(AdapterError(f"broker refused the connection: {reason_code}"))
            return
        if self._stopping:
            return
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
        self.state = "connected"
        self.subscriptions = 0
        self._log.info("%s: connected to %s:%s as %s", self.name, self.options.host,
                       self.options.port, self.client_id)
        # Subscribing here, once per connection, restores subscriptions after a
        # broker restart. With a kept session the broker already has them; a
        # SUBSCRIBE with the same filter replaces the old one, so none doubles.
        result, _mid = client.subscribe(self._topics)
        if result != 0:
            self.record_error(AdapterError(f"subscribe failed with code {result}"))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.connect_failures += 1
        if not self._stopping:
            self.state = "reconnecting"
            self.record_error(AdapterError(
                f"cannot connect to {self.options.host}:{self.options.port}; retrying"))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self.subscriptions = 0
        if self._stopping:
            return
        # After a refused CONNACK paho reports a disconnect too; the refusal
        # was already recorded, and is the more useful last_error.
        was_connected = self.state == "connected"
        self.state = "reconnecting"
        if was_connected and reason_code.is_failure:
            self.record_error(AdapterError(f"connection lost: {reason_code}; reconnecting"))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        for (topic, _qos), code in zip(self._topics, reason_codes, strict=False):
            if code.is_failure:
                self.record_error(AdapterError(f"broker refused subscription {topic!r}: {code}"))
            else:
                self.subscriptions += 1

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._buffering_failed = False
        self._read_message(message)
        if message.qos == 0:
            return
        if self._buffering_failed:
            # Not acknowledged: the broker keeps the message and sends it again on the
            # next connection of this session (after a restart or a lost link).
            self.unacked += 1
            return
        try:
            # Its points are in the buffer now (bad payloads included: they are
            # counted and dropped on purpose, and sending them again would not help).
            client.ack(message.mid, message.qos)
        except Exception as exc:
            self.record_error(exc)

    def emit(self, metric: str, value: Any, timestamp: float | None = None,
             tags: dict[str, str] | None = None) -> bool:
        # As Adapter.emit, but a point that could not be buffered (the pipeline is
        # closing, the disk is full) keeps its message unacknowledged.
        assert self._ctx is not None, "emit() before start()"
        try:
            self._ctx.emit(metric, value, timestamp, tags)
        except BufferingError as exc:
            self._buffering_failed = True
            self.record_error(exc)
            return False
        except PlexusError as exc:
            self.bad_input(f"point {metric!r} rejected: {exc}")
            return False
        self.points += 1
        self.last_point_time = time.time()
        return True

    def _read_message(self, message: Any) -> None:
        # An exception escaping a paho callback would end paho's thread (and
        # with it every reconnect), so nothing may leave this method.
        try:
            self.messages += 1
            payload: bytes = message.payload
            if not payload:
                return  # deleting a retained message publishes an empty payload
            topic: str = message.topic
            if len(payload) > self.options.max_payload_bytes:
                self._bad(f"{topic}: payload of {len(payload)} bytes is larger than "
                          f"max_payload_bytes ({self.options.max_payload_bytes})")
                return
            route = self._routes.get(topic)
            if route is None:
                route = self._route(topic)
            if isinstance(route, str):
                self._bad(route)
                return
            self._handle(topic, route[0], route[1], payload)
        except Exception as exc:
            self.record_error(exc)

    # Parsing ---------------------------------------------------------------
    def _bad(self, reason: str) -> None:
        self.bad_payloads += 1
        self.bad_input(reason)

    def _route(self, topic: str) -> tuple[str, dict[str, str] | None] | str:
        o = self.options
        levels = topic.split("/")
        route: tuple[str, dict[str, str] | None] | str
        if o.metric_template is not None:
            try:
                metric = o.metric_template.format(
                    *levels, topic=".".join(level for level in levels if level))
            except (IndexError, KeyError):
                metric = ""
        else:
            metric = ".".join(level for level in levels if level)
        if not metric:
            route = (f"{topic}: metric_template {o.metric_template!r} needs a level the topic "
                     "does not have" if o.metric_template is not None
                     else f"{topic}: the topic gives an empty metric name")
        else:
            if o.prefix:
                metric = f"{o.prefix}.{metric}"
            tags: dict[str, str] = {}
            n = len(levels)
            for tag, index in o.tag_segments.items():
                # A level the topic does not have leaves the tag out: wildcard
                # subscriptions can match topics of different depths.
                if -n <= index < n and levels[index]:
                    tags[tag] = levels[index]
            route = (metric, tags or None)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _handle(self, topic: str, metric: str, tags: dict[str, str] | None,
                payload: bytes) -> None:
        fmt = self.options.payload_format
        try:
            if fmt == "auto":
                value = self._parse_auto(payload)
            elif fmt == "json":
                try:
                    value = orjson.loads(payload)
                except orjson.JSONDecodeError as exc:
                    raise _Bad(f"not JSON: {exc}") from exc
            elif fmt == "number":
                value = self._parse_number(self._text(payload))
            else:
                value = self._text(payload)
        except _Bad as exc:
            self._bad(f"{topic}: {exc}: {payload[:60]!r}")
            return

        timestamp: float | None = None
        if self._timestamp_path is not None:
            raw = _lookup(value, self._timestamp_path)
            try:
                if raw is _MISSING or raw is None:
                    raise _Bad(f"no timestamp at {self.options.timestamp_path!r}")
                timestamp = timestamp_seconds(raw)
            except (_Bad, LineError) as exc:
                self.bad_timestamps += 1
                self.bad_input(f"{topic}: {exc}; using the receive time")
        if self._value_path is not None:
            value = _lookup(value, self._value_path)
            if value is _MISSING:
                self._bad(f"{topic}: no value at {self.options.value_path!r}")
                return
        if value is None:
            self._bad(f"{topic}: the value is null")
            return
        kind = type(value)
        if kind is dict or (kind is list and self._index_arrays):
            if self._flatten(metric, value, timestamp, tags, self._skip_path) == 0:
                self._bad(f"{topic}: the JSON has no values")
        else:
            self.emit(metric, value, timestamp, tags)

    def _flatten(self, metric: str, value: Any, timestamp: float | None,
                 tags: dict[str, str] | None, skip: tuple[str, ...] | None) -> int:
        """Emit each leaf of a JSON object/array; returns how many leaves there were."""
        items = value.items() if type(value) is dict else enumerate(value)
        count = 0
        for key, item in items:
            key = str(key)
            child_skip = None
            if skip is not None and skip[0] == key:
                if len(skip) == 1:
                    continue  # the timestamp itself
                child_skip = skip[1:]
            if item is None:
                continue
            kind = type(item)
            name = f"{metric}.{key}"
            if kind is dict or (kind is list and self._index_arrays):
                count += self._flatten(name, item, timestamp, tags, child_skip)
            else:
                self.emit(name, item, timestamp, tags)
                count += 1
        return count

    @staticmethod
    def _text(payload: bytes) -> str:
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise _Bad("not UTF-8 text") from exc
        if not text:
            raise _Bad("only white space")
        return text

    @staticmethod
    def _parse_number(text: str) -> int | float:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError as exc:
            raise _Bad("not a number") from exc
        if not math.isfinite(number):
            raise _Bad("not a finite number")
        return number

    def _parse_auto(self, payload: bytes) -> Any:
        # A failed JSON parse builds a costly exception; plain words skip the attempt.
        if payload[0] in _JSON_FIRST_BYTES:
            try:
                return orjson.loads(payload)
            except orjson.JSONDecodeError:
                pass
        text = self._text(payload)
        if text[:1] in ("{", "["):
            raise _Bad("looks like JSON but does not parse")
        lowered = text.lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
        try:
            return self._parse_number(text)
        except _Bad:
            if lowered in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity", "+infinity"):
                raise
        return text
