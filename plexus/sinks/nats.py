"""The ``nats`` sink: publish batches to NATS JetStream and wait for the stream's ack.

Each batch becomes one message (more when it is larger than the server's
``max_payload``): the points as JSON Lines, one object per line, the same
lines the ``file`` sink writes. The message carries ``Nats-Msg-Id: <batch
key>`` (``<key>.<n>`` for the n-th message of a split batch). The uploader
retries a batch with the same key, so a retried batch that the stream had in
fact stored is dropped by the stream's duplicate window (two minutes unless
the stream says otherwise) and acknowledged as a duplicate: delivery is
exactly once as long as a retry comes within that window.

A batch counts as delivered when JetStream has acknowledged every message of
it (the ack means the stream stored it). Failures:

- no server, a lost link, no ack within ``timeout``, the stream unavailable
  or full: retryable (the batch is kept; messages already acknowledged are
  not sent again).
- no stream captures the subject: retryable, with a message that says so
  (the data stays buffered until the stream exists).
- the server refuses the login, or the user may not publish to the subject:
  :class:`AuthenticationError`.
- a message over the stream's ``max_msg_size``: split in halves until it
  fits; a single point that still does not fit is rejected.

nats-py is an asyncio library; the sink runs its own event loop in a thread
and the uploader's calls wait on it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from plexus.adapters.base import RateLimitedLog, require
from plexus.errors import (
    AuthenticationError,
    InvalidOptions,
    PlexusError,
    RetryableSinkError,
    SinkError,
)
from plexus.optioncheck import declared_problems
from plexus.point import Point, json_lines
from plexus.sinks.base import SendResult, Sink

log = logging.getLogger(__name__)
T = TypeVar("T")

# Room left in a message for the protocol line and headers.
_HEADROOM = 512
# JetStream API error codes.
_TOO_LARGE = 10054  # message size exceeds the stream's max_msg_size
_WRONG_STREAM = 10060  # the subject is captured by another stream than `stream`


@dataclass
class NatsSinkOptions:
    """Options of the ``nats`` sink."""

    servers: list[str] = field(
        default_factory=lambda: ["nats://localhost:4222"],
        metadata={"help": "server URLs (nats:// or tls://); the client fails over between them"},
    )
    subject: str = field(
        default="plexus.{source_id}",
        metadata={"help": "subject of the messages; {source_id} is the gateway's source id"},
    )
    stream: str | None = field(
        default=None,
        metadata={"help": "the JetStream stream expected to store them; a publish the server "
                  "routes to another stream fails (None: any stream capturing the subject)"},
    )
    timeout: float = field(
        default=10.0, metadata={"help": "seconds to connect, and to wait for each ack", "gt": 0}
    )
    max_message_bytes: int | None = field(
        default=None,
        metadata={"help": "split batches into messages of at most this many bytes; "
                  "None: the server's max_payload", "ge": 1024},
    )
    user: str | None = field(default=None, metadata={"help": "user name"})
    password: str | None = field(
        default=None, repr=False,
        metadata={"help": "password, e.g. ${NATS_PASSWORD}; never logged", "secret": True},
    )
    token: str | None = field(
        default=None, repr=False,
        metadata={"help": "authentication token, e.g. ${NATS_TOKEN}; never logged",
                  "secret": True},
    )
    creds: str | None = field(
        default=None,
        metadata={"help": "a .creds file (JWT and NKey seed; needs the nkeys package)",
                  "path": True},
    )
    tls: bool = field(default=False, metadata={"help": "require TLS (also implied by tls://)"})
    ca_certs: str | None = field(
        default=None, metadata={"help": "CA bundle (PEM) to verify the server", "path": True}
    )
    certfile: str | None = field(
        default=None, metadata={"help": "client certificate (PEM)", "path": True}
    )
    keyfile: str | None = field(
        default=None, metadata={"help": "client private key (PEM)", "path": True}
    )

    def __post_init__(self) -> None:
        # Declared limits were checked by the rig loader, each at its line; this holds
        # options built in Python to them too and adds the rules joining several fields.
        if isinstance(self.servers, str):
            self.servers = [self.servers]
        problems = declared_problems(self)
        if not self.servers:
            problems.append(("servers", "must name at least one server URL"))
        for index, url in enumerate(self.servers):
            if not isinstance(url, str) or "://" not in url:
                problems.append((f"servers[{index}]", f"{url!r} must be a URL like "
                                 "nats://host:4222"))
        try:
            subject = self.subject.format(source_id="rig-01")
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(("subject", f"{self.subject!r} is invalid ({exc!r}); the only "
                             "field is {source_id}"))
        else:
            tokens = subject.split(".")
            if (not subject or any(not t for t in tokens) or any(t in ("*", ">") for t in tokens)
                    or any(c.isspace() for c in subject)):
                problems.append(("subject", f"{self.subject!r} must be dot-separated tokens "
                                 "without spaces or wildcards ('*', '>')"))
        if self.password is not None and self.user is None:
            problems.append(("password", "is set without a user"))
        if sum(x is not None for x in (self.user, self.token, self.creds)) > 1:
            problems.append(("", "use one of user/password, token or creds"))
        if (self.certfile is None) != (self.keyfile is None):
            problems.append(("certfile" if self.keyfile is None else "keyfile",
                             "certfile and keyfile go together"))
        if problems:
            raise InvalidOptions(problems)


class _Loop:
    """An asyncio event loop running in its own daemon thread."""

    def __init__(self, name: str) -> None:
        import asyncio  # here, not at the top: it costs ~40 ms, and plugin loading imports us

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class _TooLarge(Exception):
    """The server or the stream refused a message for its size."""


class NatsSink(Sink):
    """Publish batches to a NATS JetStream stream, one ``Nats-Msg-Id`` per batch.

    Parameters:
        options: :class:`NatsSinkOptions`.
        name: the sink's name in logs and status.

    Raises:
        SinkError: from :meth:`open` when nats-py is missing.
    """

    type_name: ClassVar[str] = "nats"
    Options: ClassVar[type] = NatsSinkOptions
    extra: ClassVar[str | None] = "nats"
    requires: ClassVar[tuple[str, ...]] = ("nats",)

    def __init__(self, options: NatsSinkOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.options: NatsSinkOptions = options
        self.subject = ""
        self.source_id = ""
        self.messages = 0  # messages the stream acknowledged
        self.duplicates = 0  # of those, how many it had already (a retried batch)
        self.connects = 0
        self._nats: Any = None
        self._loop: _Loop | None = None
        self._nc: Any = None
        self._js: Any = None
        self._denied: str | None = None  # the last permissions violation the server sent
        self._resume: tuple[str, set[str]] | None = None  # (batch key, message ids acked)
        self._errors_log = RateLimitedLog(log)

    def __repr__(self) -> str:
        return (f"NatsSink(name={self.name!r}, servers={self.options.servers!r}, "
                f"subject={self.subject or self.options.subject!r})")

    def open(self, source_id: str) -> None:
        self.source_id = source_id
        self.subject = self.options.subject.format(source_id=source_id)
        try:
            self._nats = require("nats", "nats")
        except PlexusError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc
        if self._loop is None:
            self._loop = _Loop(f"plexus-nats:{self.name}")

    def close(self) -> None:
        if self._loop is None:
            return
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), self.options.timeout)
            except Exception as exc:  # closing a broken link must not block shutdown
                log.debug("%s: close failed: %s", self.name, exc)
            self._nc = None
        self._loop.stop()
        self._loop = None

    # Sending -------------------------------------------------------------
    def send(self, points: list[Point], key: str) -> SendResult:
        assert self._loop is not None, "open() first"
        acked = self._resume[1] if self._resume is not None and self._resume[0] == key else set()
        self._resume = None
        rejected: list[tuple[int, str]] = []
        try:
            # Generous: each ack has its own timeout inside; this only guards a hang.
            self._loop.run(self._send(points, key, acked, rejected),
                           self.options.timeout * (2 + len(points) // 1000))
        except AuthenticationError:
            self._resume = (key, acked)
            raise
        except RetryableSinkError:
            self._resume = (key, acked)
            raise
        except concurrent.futures.TimeoutError as exc:
            self._resume = (key, acked)
            raise RetryableSinkError(f"no answer from NATS within the timeout ({exc!r})") from exc
        rejected.sort()
        return SendResult(len(points) - len(rejected), rejected)

    async def _send(self, points: list[Point], key: str, acked: set[str],
                    rejected: list[tuple[int, str]]) -> None:
        await self._connect()
        limit = self._nc.max_payload - _HEADROOM
        if self.options.max_message_bytes is not None:
            limit = min(limit, self.options.max_message_bytes)
        chunks = self._chunks(points, limit, rejected)
        for n, (lines, indices) in enumerate(chunks):
            msg_id = key if len(chunks) == 1 else f"{key}.{n}"
            await self._publish(lines, indices, msg_id, acked, rejected)

    def _chunks(self, points: list[Point], limit: int,
                rejected: list[tuple[int, str]]) -> list[tuple[list[bytes], list[int]]]:
        """Lines grouped into messages of at most ``limit`` bytes (the same for a retry)."""
        chunks: list[tuple[list[bytes], list[int]]] = []
        lines: list[bytes] = []
        indices: list[int] = []
        size = 0
        for index, point in enumerate(points):
            line = json_lines(self.source_id, [point])
            if len(line) > limit:
                rejected.append((index, f"the point is {len(line)} bytes of JSON, more than "
                                        f"a message may carry ({limit})"))
                continue
            if size + len(line) > limit and lines:
                chunks.append((lines, indices))
                lines, indices, size = [], [], 0
            lines.append(line)
            indices.append(index)
            size += len(line)
        if lines:
            chunks.append((lines, indices))
        return chunks

    async def _publish(self, lines: list[bytes], indices: list[int], msg_id: str,
                       acked: set[str], rejected: list[tuple[int, str]]) -> None:
        if msg_id in acked:
            return  # stored before the retry: not sent again
        try:
            ack = await self._publish_one(b"".join(lines), msg_id)
        except _TooLarge as exc:
            if len(lines) == 1:
                rejected.append((indices[0], str(exc)))
                return
            mid = len(lines) // 2
            await self._publish(lines[:mid], indices[:mid], f"{msg_id}.a", acked, rejected)
            await self._publish(lines[mid:], indices[mid:], f"{msg_id}.b", acked, rejected)
            return
        acked.add(msg_id)
        self.messages += 1
        if ack.duplicate:
            self.duplicates += 1

    async def _publish_one(self, payload: bytes, msg_id: str) -> Any:
        nats, o = self._nats, self.options
        self._denied = None
        self.record_sent(len(payload))
        try:
            return await self._js.publish(self.subject, payload, timeout=o.timeout,
                                          stream=o.stream, headers={"Nats-Msg-Id": msg_id})
        except nats.errors.MaxPayloadError as exc:
            raise _TooLarge(f"larger than the server's max_payload: {exc}") from exc
        except nats.js.errors.NoStreamResponseError as exc:
            raise RetryableSinkError(
                f"no JetStream stream stores subject {self.subject!r}: create one whose "
                "subjects include it (the data stays buffered)") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _TOO_LARGE:
                raise _TooLarge(f"larger than the stream's max_msg_size: {exc.description}") \
                    from exc
            if exc.err_code == _WRONG_STREAM:
                raise RetryableSinkError(
                    f"subject {self.subject!r} is stored by another stream than "
                    f"{o.stream!r} ({exc.description})") from exc
            raise RetryableSinkError(f"JetStream refused the message: {exc.description} "
                                     f"(code {exc.code}, error {exc.err_code})") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            if self._denied is not None:
                raise AuthenticationError(f"NATS refused the publish: {self._denied}") from exc
            raise RetryableSinkError(f"no JetStream ack within {o.timeout:g} s") from exc
        except nats.errors.Error as exc:  # closed, reconnecting, outbound buffer full...
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from exc

    # The connection --------------------------------------------------------
    async def _connect(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            return
        if self._nc is not None and not self._nc.is_closed and self._nc.is_reconnecting:
            raise RetryableSinkError("reconnecting to NATS")
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
        import asyncio

        nats, o = self._nats, self.options
        nc = nats.NATS()
        try:
            await asyncio.wait_for(nc.connect(**self._connect_options()), o.timeout)
        except nats.errors.AuthorizationError as exc:
            await nc.close()
            raise AuthenticationError(f"NATS refused the login to {o.servers}") from exc
        except (asyncio.TimeoutError, TimeoutError, OSError, nats.errors.Error) as exc:
            last = getattr(nc, "last_error", None)
            await nc.close()
            # While connecting, nats-py reports the server's -ERR as a plain Error.
            if isinstance(last, nats.errors.AuthorizationError) or (
                    last is not None and "Authorization Violation" in str(last)):
                raise AuthenticationError(f"NATS refused the login to {o.servers}") from exc
            raise RetryableSinkError(
                f"cannot connect to {o.servers}: {type(last or exc).__name__}: "
                f"{last or exc}") from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=o.timeout)
        self.connects += 1

    def _connect_options(self) -> dict[str, Any]:
        o = self.options
        kwargs: dict[str, Any] = {
            "servers": o.servers,
            "name": f"plexus-gateway {self.source_id}",
            "connect_timeout": max(1, int(o.timeout)),
            # A short reconnect spell rides out a blip; after it the client
            # closes and the next send connects afresh.
            "max_reconnect_attempts": 3,
            "reconnect_time_wait": 1,
            "error_cb": self._on_error,
        }
        if o.user is not None:
            kwargs["user"], kwargs["password"] = o.user, o.password
        if o.token is not None:
            kwargs["token"] = o.token
        if o.creds is not None:
            kwargs["user_credentials"] = o.creds
        if o.tls or o.ca_certs or o.certfile or any(s.startswith("tls://") for s in o.servers):
            import ssl

            context = ssl.create_default_context(cafile=o.ca_certs)
            if o.certfile is not None:
                context.load_cert_chain(o.certfile, o.keyfile)
            kwargs["tls"] = context
        return kwargs

    async def _on_error(self, error: Exception) -> None:
        text = str(error)
        if "permissions violation" in text.lower():
            self._denied = text.removeprefix("nats: ")
        self._errors_log(logging.WARNING, "%s: %s", self.name, text or type(error).__name__)
