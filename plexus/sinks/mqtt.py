"""The ``mqtt`` sink: publish every point to an MQTT broker, QoS 1.

One message per point, on a topic built from ``topic`` (a template, see
:class:`MqttSinkOptions`), with the point as JSON (``payload: json``) or just
its value (``payload: value``); or, with ``batch: true``, one message per
topic per batch holding the points' JSON objects as JSON Lines. A point
counts as delivered when the broker has acknowledged its message (PUBACK at
QoS 1, PUBCOMP at QoS 2); a batch is done when every message of it is.

paho-mqtt costs about 100 us of CPU per message, so one message per point
tops out at a few thousand points a second; ``batch: true`` is the mode for
busy buses (bench/sinks.py measures both).

Failures:

- cannot connect, link lost, or some messages not acknowledged within
  ``timeout``: retryable. The messages already acknowledged are remembered
  for that batch, so its retry publishes only the rest (a PUBACK lost with
  the link can still make the broker see a message twice: at least once).
- the broker refuses the login (CONNACK "bad user name or password" / "not
  authorized"), or (MQTT 5) refuses a publish as not authorized:
  :class:`AuthenticationError`; the data stays buffered.
- a point whose topic cannot be built (a tag the template names is missing,
  the metric holds ``+``/``#``) or that the broker refuses for good (MQTT 5:
  topic name invalid, payload format invalid, packet too large): rejected,
  counted, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import orjson
from annotated_types import Ge, Gt, Interval

from plexus.adapters.base import require
from plexus.errors import (
    AuthenticationError,
    InvalidOptions,
    RetryableSinkError,
    SinkError,
)
from plexus.optioncheck import declared_problems
from plexus.point import Point
from plexus.sinks.base import SendResult, Sink

log = logging.getLogger(__name__)

# MQTT 5 reason codes (PUBACK/PUBCOMP) that mean the point can never be published as is.
_REJECTED_CODES = {
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}
_NOT_AUTHORIZED = 0x87
_MAX_TOPIC_BYTES = 65535


@dataclass
class MqttSinkOptions:
    """Options of the ``mqtt`` sink."""

    host: str = field(default="localhost", metadata={"help": "broker host name or address"})
    port: Annotated[int, Interval(ge=1, le=65535)] = field(
        default=1883, metadata={"help": "broker port (8883 is usual for TLS)"})
    topic: str = field(
        default="plexus/{source_id}/{metric_path}",
        metadata={"help": "topic template: {source_id}, {metric}, {metric_path} (the metric "
                  "with '.' as '/'), {tags[name]} (a point without that tag is rejected)"},
    )
    payload: Literal["json", "value"] = field(
        default="json",
        metadata={"help": "'json': {source_id, metric, value, timestamp (ms), tags}; "
                  "'value': the value alone (numbers and true/false as text, objects as JSON)"},
    )
    batch: bool = field(
        default=False,
        metadata={"help": "one message per topic per batch, the points' JSON objects as "
                  "JSON Lines (needs payload: json; many times faster than one per point)"},
    )
    max_message_bytes: Annotated[int, Ge(1024)] = field(
        default=262_144,
        metadata={"help": "batch: cut a topic's lines into messages of at most this size"},
    )
    qos: Literal[1, 2] = field(
        default=1, metadata={"help": "1 (PUBACK) or 2 (PUBCOMP) = delivered; 0 has no "
                             "acknowledgement, so nothing could count as delivered"})
    retain: bool = field(default=False, metadata={"help": "publish as retained messages"})
    protocol: Literal["5", "3.1.1"] = field(
        default="3.1.1",
        metadata={"help": "MQTT version: '3.1.1' or '5' (5 reports per-message refusals)"},
    )
    client_id: str | None = field(
        default=None, metadata={"help": "MQTT client id; None: plexus-sink-<random hex>"}
    )
    keepalive: Annotated[int, Ge(1)] = field(
        default=60, metadata={"help": "keepalive interval, seconds"})
    timeout: Annotated[float, Gt(0)] = field(
        default=10.0,
        metadata={"help": "seconds to connect, and for a batch's last acknowledgement"},
    )
    max_inflight: Annotated[int, Ge(1)] = field(
        default=100, metadata={"help": "messages awaiting acknowledgement at once"}
    )
    username: str | None = field(default=None, metadata={"help": "broker user name"})
    password: str | None = field(
        default=None, repr=False,
        metadata={"help": "broker password, e.g. ${MQTT_PASSWORD}; never logged",
                  "secret": True},
    )
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_certs: str | None = field(
        default=None,
        metadata={"help": "CA bundle (PEM) to verify the broker; None: system CAs", "path": True},
    )
    certfile: str | None = field(
        default=None, metadata={"help": "client certificate (PEM)", "path": True}
    )
    keyfile: str | None = field(
        default=None, metadata={"help": "client private key (PEM)", "path": True}
    )
    tls_insecure: bool = field(
        default=False,
        metadata={"help": "skip the broker host name check (logs a warning; testing only)"},
    )

    def __post_init__(self) -> None:
        # Declared limits were checked by the rig loader, each at its line; this holds
        # options built in Python to them too and adds the rules joining several fields.
        problems = declared_problems(self)
        if self.batch and self.payload != "json":
            problems.append(("batch", "needs payload: json (values alone cannot be told "
                             "apart in one message)"))
        if not self.tls and (self.ca_certs or self.certfile or self.keyfile):
            problems.append(("tls", "is false, but ca_certs/certfile/keyfile are set"))
        if self.password is not None and self.username is None:
            problems.append(("password", "is set without a username"))
        problem = _template_problem(self.topic)
        if problem:
            problems.append(("topic", problem))
        if problems:
            raise InvalidOptions(problems)


def _template_problem(template: str) -> str | None:
    sample: defaultdict[str, str] = defaultdict(lambda: "t")
    try:
        topic = template.format(source_id="s", metric="m", metric_path="m", tags=sample)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return (f"{template!r} is invalid ({exc!r}); use {{source_id}}, {{metric}}, "
                "{metric_path} and {tags[name]}")
    if not topic or "+" in topic or "#" in topic:
        return (f"{template!r} must not be empty or hold '+' or '#' (wildcards are for "
                "subscribing)")
    return None


class _TagView:
    """``{tags[name]}`` in a template: a missing tag names itself in the error."""

    __slots__ = ("_tags",)

    def __init__(self, tags: dict[str, str] | None) -> None:
        self._tags = tags or {}

    def __getitem__(self, name: str) -> str:
        try:
            return self._tags[name]
        except KeyError:
            raise _Unpublishable(f"the topic template needs tag {name!r}, which the point "
                                 "does not have") from None


class _Unpublishable(Exception):
    """A point that cannot become an MQTT message; the message says why."""


class MqttSink(Sink):
    """Publish points to an MQTT broker; a PUBACK (QoS 1) means delivered.

    Parameters:
        options: :class:`MqttSinkOptions`.
        name: the sink's name in logs and status.

    Raises:
        SinkError: from :meth:`open` when paho-mqtt is missing.
    """

    type_name: ClassVar[str] = "mqtt"
    Options: ClassVar[type] = MqttSinkOptions
    #: pip extra and modules, named by ``--check`` when missing.
    extra: ClassVar[str | None] = "mqtt"
    requires: ClassVar[tuple[str, ...]] = ("paho.mqtt.client",)

    def __init__(self, options: MqttSinkOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: MqttSinkOptions = options
        self.client_id = options.client_id or f"plexus-sink-{secrets.token_hex(6)}"
        self.source_id = ""
        self.connects = 0
        self.published = 0  # messages acknowledged by the broker
        self._mqtt: Any = None
        self._client: Any = None
        self._connack: Any = None  # reason code of the last CONNACK
        self._lost: str | None = None  # why the link went down, while it is down
        self._acks: dict[int, int] = {}  # mid -> reason code value, not yet looked at
        self._last_io = 0.0  # when the connection was last used (monotonic)
        self._window = options.max_inflight  # messages awaiting acknowledgement at once
        self._resume: tuple[str, set[int]] | None = None  # (batch key, indices acknowledged)
        self._uses_tags = "{tags" in options.topic
        self._topics: dict[str, str] = {}

    def __repr__(self) -> str:
        o = self.options
        return (f"MqttSink(name={self.name!r}, broker={o.host}:{o.port}, topic={o.topic!r}, "
                f"qos={o.qos})")

    def open(self, source_id: str) -> None:
        self.source_id = source_id
        try:
            self._mqtt = require("paho.mqtt.client", "mqtt")
        except Exception as exc:
            raise SinkError(f"{self.name}: {exc}") from exc

    def close(self) -> None:
        self._drop_client()

    # Sending -------------------------------------------------------------
    def send(self, points: list[Point], key: str) -> SendResult:
        client = self._connected()
        done = self._resume[1] if self._resume is not None and self._resume[0] == key else set()
        self._resume = None
        rejected: list[tuple[int, str]] = []
        waiting: dict[int, list[int]] = {}  # mid -> the batch positions its message carries
        self._acks.clear()
        o = self.options
        messages = self._batched(points, done, rejected) if o.batch else \
            self._one_per_point(points, done, rejected)
        for topic, payload, indices in messages:
            if len(waiting) >= self._window:
                self._wait_for_acks(key, done, waiting, rejected, self._window - 1)
            info = client.publish(topic, payload, qos=o.qos, retain=o.retain)
            if info.rc != 0:  # the link went down under us: paho reports it here
                self._fail(key, done, waiting, f"publish failed: {self._mqtt.error_string(info.rc)}")
            self.record_sent(len(payload))
            waiting[info.mid] = indices
        self._wait_for_acks(key, done, waiting, rejected, 0)
        rejected.sort()
        return SendResult(len(points) - len(rejected), rejected)

    def _one_per_point(self, points: list[Point], done: set[int],
                       rejected: list[tuple[int, str]]) -> Iterator[tuple[str, bytes, list[int]]]:
        for index, point in enumerate(points):
            if index in done:
                continue
            try:
                topic, payload = self._message(point)
            except _Unpublishable as exc:
                rejected.append((index, str(exc)))
                continue
            yield topic, payload, [index]

    def _batched(self, points: list[Point], done: set[int],
                 rejected: list[tuple[int, str]]) -> Iterator[tuple[str, bytes, list[int]]]:
        """One message per topic, the points as JSON Lines, cut at ``max_message_bytes``.

        A retried batch is cut the same way, so ``done`` holds whole messages.
        """
        groups: dict[str, tuple[list[bytes], list[int]]] = {}
        for index, point in enumerate(points):
            try:
                topic, payload = self._message(point)
            except _Unpublishable as exc:
                rejected.append((index, str(exc)))
                continue
            lines, indices = groups.setdefault(topic, ([], []))
            lines.append(payload + b"\n")
            indices.append(index)
        limit = self.options.max_message_bytes
        for topic, (lines, indices) in groups.items():
            start, size = 0, 0
            for end, line in enumerate(lines):
                if size + len(line) > limit and end > start:
                    if indices[start] not in done:
                        yield topic, b"".join(lines[start:end]), indices[start:end]
                    start, size = end, 0
                size += len(line)
            if indices[start] not in done:
                yield topic, b"".join(lines[start:]), indices[start:]

    def _wait_for_acks(self, key: str, done: set[int], waiting: dict[int, list[int]],
                       rejected: list[tuple[int, str]], at_most: int) -> None:
        """Read acknowledgements until at most ``at_most`` messages await one.

        Raises RetryableSinkError when none comes for ``timeout`` seconds or
        the link is lost, AuthenticationError for an MQTT 5 "not authorized".
        """
        client = self._client
        deadline = time.monotonic() + self.options.timeout
        failure: str | None = None
        refused = False
        while True:
            acks, self._acks = self._acks, {}
            for mid, code in acks.items():
                indices = waiting.pop(mid, None)
                if indices is None:
                    continue  # not of this batch
                if code < 0x80:
                    done.update(indices)
                    self.published += 1
                elif code in _REJECTED_CODES:
                    reason = f"the broker refused it: {_REJECTED_CODES[code]}"
                    rejected.extend((index, reason) for index in indices)
                elif code == _NOT_AUTHORIZED:
                    refused = True
                else:
                    failure = f"the broker answered reason code 0x{code:02x}"
            if acks:
                deadline = time.monotonic() + self.options.timeout  # progress: wait again
            if len(waiting) <= at_most or failure or refused:
                break
            remaining = deadline - time.monotonic()
            if self._lost is not None:
                failure = self._lost
                break
            if remaining <= 0:
                failure = f"no acknowledgement within {self.options.timeout:g} s"
                break
            rc = client.loop(min(remaining, 0.2))
            if rc != 0 and self._lost is None:
                self._lost = f"connection lost: {self._mqtt.error_string(rc)}"
        self._last_io = time.monotonic()
        if refused:
            self._resume = (key, set(done))
            self._drop_client()
            raise AuthenticationError(
                f"the broker refused to let {self.client_id} publish (not authorized); "
                "check the user's access to the topic")
        if failure is not None:
            self._fail(key, done, waiting, failure)

    def _fail(self, key: str, done: set[int], waiting: dict[int, list[int]],
              reason: str) -> None:
        # A fresh connection for the retry: paho would otherwise re-send the
        # unacknowledged messages itself, on top of the retry's own.
        self._resume = (key, set(done))
        self._drop_client()
        raise RetryableSinkError(
            f"{len(waiting)} messages not acknowledged by {self.options.host}:"
            f"{self.options.port} ({reason}); they will be published again")

    def _message(self, point: Point) -> tuple[str, bytes]:
        metric, value, ts, tags = point
        topic = self._topic(metric, tags)
        if self.options.payload == "json":
            payload = orjson.dumps({"source_id": self.source_id, "metric": metric,
                                    "value": value, "timestamp": ts, "tags": tags or {}})
        elif isinstance(value, str):
            payload = value.encode()
        else:  # numbers, true/false, objects and lists: their JSON text
            payload = orjson.dumps(value)
        return topic, payload

    def _topic(self, metric: str, tags: dict[str, str] | None) -> str:
        if not self._uses_tags:
            cached = self._topics.get(metric)
            if cached is not None:
                return cached
        topic = self.options.topic.format(
            source_id=self.source_id, metric=metric, metric_path=metric.replace(".", "/"),
            tags=_TagView(tags))
        if "+" in topic or "#" in topic or "\0" in topic:
            raise _Unpublishable(f"topic {topic!r} holds '+', '#' or NUL, which MQTT "
                                 "forbids in a published topic")
        if len(topic.encode()) > _MAX_TOPIC_BYTES:
            raise _Unpublishable("the topic is longer than MQTT allows (65535 bytes)")
        if not self._uses_tags:
            if len(self._topics) >= 4096:
                self._topics.clear()
            self._topics[metric] = topic
        return topic

    # The connection --------------------------------------------------------
    # paho runs without its network thread: the uploader thread publishes and
    # reads the acknowledgements itself. Handing every message to a second
    # thread cost ~200 us of CPU per point in thread hand-offs.
    def _connected(self) -> Any:
        client, o = self._client, self.options
        if client is not None:
            idle = time.monotonic() - self._last_io
            if idle < 1.5 * o.keepalive:  # past that, the broker has dropped us
                # Reads what came while idle (a DISCONNECT) and pings if one is due.
                if client.loop(0) == 0 and self._lost is None:
                    return client
        self._drop_client()
        mqtt = self._mqtt
        assert mqtt is not None, "open() first"
        v5 = o.protocol == "5"
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            # We reconnect on the next send: paho reconnecting on its own would
            # also re-send the old batch's messages behind our back.
            reconnect_on_failure=False,
        )
        from plexus.adapters.mqtt import set_login_and_tls

        try:
            set_login_and_tls(client, o, log, self.name)
        except (OSError, ValueError) as exc:
            raise RetryableSinkError(f"cannot load the TLS files: {exc}") from exc
        # paho's own in-flight limit rescans every queued message on each PUBACK
        # (quadratic in the batch); send() keeps the window itself instead.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = o.timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._connack = None
        self._lost = None
        try:
            client.connect(o.host, o.port, keepalive=o.keepalive,
                           **({"clean_start": True} if v5 else {}))
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake failed
            raise RetryableSinkError(
                f"cannot connect to {o.host}:{o.port}: {type(exc).__name__}: {exc}") from exc
        self._client = client
        deadline = time.monotonic() + o.timeout
        while self._connack is None and self._lost is None and time.monotonic() < deadline:
            if client.loop(0.1) != 0 and self._lost is None:
                self._lost = "the broker closed the connection"
        connack, lost = self._connack, self._lost
        if connack is None or connack.is_failure:
            self._drop_client()
            if connack is not None and connack.value in (0x86, 0x87, 4, 5):
                raise AuthenticationError(
                    f"the broker {o.host}:{o.port} refused the login: {connack}")
            raise RetryableSinkError(f"the broker {o.host}:{o.port} did not accept the "
                                     f"connection: {connack or lost or 'no CONNACK in time'}")
        self.connects += 1
        self._last_io = time.monotonic()
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.disconnect()  # written at once (no network thread), then closed
        except Exception as exc:  # a broken link must not stop the retry
            log.debug("%s: disconnect failed: %s", self.name, exc)

    # paho callbacks (run inside client.loop(), in the uploader thread) -----
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        self._connack = reason_code
        # An MQTT 5 broker may take fewer unacknowledged messages than we would send.
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self._window = min(self.options.max_inflight, receive_maximum or self.options.max_inflight)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._lost = f"connection lost: {reason_code}"

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        self._acks[mid] = reason_code.value
