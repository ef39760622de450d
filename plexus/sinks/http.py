"""The Plexus HTTP sink: speaks docs/protocol.md's ``POST {gateway_url}/ingest``.

Status handling (docs/protocol.md, "Responses"):

- 200 with ``count`` equal to the points sent: delivered.
- 200 with a lower ``count``: the platform's per-source rate ceiling dropped
  the request; it was not stored. Raised as retryable with a short jittered
  ``retry_after``; never counted as delivered.
- 400: the message names ``points[i]``; that point is rejected (dropped,
  reported) and the rest resent. Without an index the batch is bisected until
  the bad point is alone.
- 401/403: :class:`AuthenticationError`; the uploader keeps the data.
- 413: the batch is split in halves until each part fits.
- 5xx, timeouts, connection errors: retryable.

Every request carries ``Idempotency-Key``: the batch key, with a suffix per
part when a batch is split, so a retried batch repeats the same keys.

The ``Date`` header of every answer (an error's too) is the platform's time:
given a clock (``attach_clock``), the sink reports it as a time reference,
and while no trustworthy time is known it asks for it with an empty request
(``points: []``, a no-op the platform answers with 200). See docs/time.md.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
from dataclasses import dataclass, field
from datetime import timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from plexus.codec import IngestCodec, gzip_bytes
from plexus.errors import AuthenticationError, ConfigError, InvalidOptions, RetryableSinkError
from plexus.optioncheck import declared_problems
from plexus.point import MAX_BODY_BYTES, MAX_POINTS_PER_REQUEST, Point
from plexus.secret import Secret
from plexus.sinks.base import SendResult, Sink

if TYPE_CHECKING:
    import httpx

    from plexus.buffer import Batch
    from plexus.clock import Clock

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_URL = "https://gateway.plexus.company"
_POINT_INDEX = re.compile(r"points\[(\d+)\]")
USER_AGENT = "plexus-gateway/0.1"


@dataclass
class HttpSinkOptions:
    """Options of the ``plexus`` sink (the HTTP uploader)."""

    gateway_url: str | None = field(
        default=None,
        metadata={"help": "base URL; requests go to {gateway_url}/ingest. Default: the "
                          "top-level gateway_url, else https://gateway.plexus.company"},
    )
    api_key: str | None = field(
        default=None, repr=False,
        metadata={"help": "API key; default: the top-level api_key", "secret": True}
    )
    # Limits as metadata, not Annotated[...]: `import plexus` loads this module.
    timeout: float = field(default=10.0, metadata={"help": "seconds per request", "gt": 0})
    verify_tls: bool = field(
        default=True, metadata={"help": "verify the server's TLS certificate (warns when off)"}
    )
    gzip_min_bytes: int = field(
        default=1024,
        metadata={"help": "gzip request bodies larger than this many bytes", "ge": 0},
    )
    gzip_level: int = field(
        default=1, metadata={"help": "gzip level 1 (fast) .. 9 (small)", "ge": 1, "le": 9})

    def __post_init__(self) -> None:
        problems = declared_problems(self)  # the rig loader checks these at load; Python too
        if problems:
            raise InvalidOptions(problems)


class HttpSink(Sink):
    """Deliver batches to the Plexus platform (or a compatible receiver).

    Parameters:
        options: :class:`HttpSinkOptions`; ``gateway_url``/``api_key`` there
            override the ones passed here.
        api_key: the key sent in ``x-api-key``; ``None`` makes every send raise
            AuthenticationError (the data stays buffered).
        gateway_url: base URL of the platform.
        transport: an ``httpx`` transport, for tests (e.g. ``httpx.MockTransport``).
    """

    type_name = "plexus"
    Options = HttpSinkOptions

    def __init__(
        self,
        options: HttpSinkOptions | None = None,
        name: str | None = None,
        *,
        api_key: str | Secret | None = None,
        gateway_url: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        options = options or HttpSinkOptions()
        super().__init__(options, name)
        key = options.api_key if options.api_key is not None else api_key
        self._api_key = key if isinstance(key, Secret) or key is None else Secret(key)
        base = (options.gateway_url or gateway_url or DEFAULT_GATEWAY_URL).rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"gateway_url must be an http:// or https:// URL, got {base!r}")
        self.url = f"{base}/ingest"
        self._host = parts.hostname
        self._scheme = parts.scheme
        self._transport = transport
        self._client: httpx.Client | None = None
        self._http_error: type[Exception] = Exception
        self._not_sent: tuple[type[Exception], ...] = ()  # failures before any byte went out
        self.source_id = ""
        self.requests = 0
        self._clock: Clock | None = None

    def __repr__(self) -> str:
        return f"HttpSink(name={self.name!r}, url={self.url!r}, api_key={self._api_key!r})"

    def open(self, source_id: str) -> None:
        self.source_id = source_id
        opts: HttpSinkOptions = self.options
        if not opts.verify_tls:
            log.warning("TLS certificate verification is OFF for %s", self.url)
        if self._scheme == "http" and not _is_loopback(self._host) and self._api_key:
            log.warning(
                "sending the API key over plain http:// to %s; use https:// outside a lab",
                self._host,
            )
        import httpx  # imported here: it costs ~90 ms, and `import plexus` must stay fast

        self._client = httpx.Client(
            timeout=opts.timeout,
            # No TLS on http://: skip building an SSL context (tens of ms at start).
            verify=opts.verify_tls if self._scheme == "https" else False,
            transport=self._transport,
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )
        self._http_error = httpx.HTTPError
        self._not_sent = (httpx.ConnectError, httpx.ConnectTimeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def attach_clock(self, clock: Clock) -> None:
        """Report the platform's time (each answer's Date header) to ``clock``."""
        self._clock = clock
        clock.add_probe(self.probe_time)

    def probe_time(self) -> None:
        """Ask the platform for its time: an empty ``/ingest`` request, whose answer's
        Date header goes to the clock. Raises what the request raises."""
        client, clock = self._client, self._clock
        if client is None or clock is None:
            return
        headers = {"x-api-key": self._api_key.reveal()} if self._api_key is not None else {}
        body = orjson.dumps({"source_id": self.source_id, "points": []})
        sent = clock.mono_ns()
        response = client.post(self.url, content=body, headers=headers)
        _report_date(clock, response, sent)

    def check_key(self, source_id: str) -> str | None:
        """Ask the platform whether it takes the key, storing nothing (an empty
        ``points`` list is the protocol's auth check). None when it does, else
        what went wrong, in an operator's words. Opens and closes its own client."""
        if self._api_key is None:
            return "no API key"
        self.open(source_id)
        try:
            status, error, _ = self._post(orjson.dumps({"source_id": source_id, "points": []}),
                                          "key-check")
        except RetryableSinkError as exc:
            return f"cannot reach the platform at {self.url}: {exc}"
        finally:
            self.close()
        if status in (401, 403):
            return f"the platform at {self.url} refused the API key ({status}: {error})"
        if status != 200:
            return f"the platform at {self.url} answered {status}: {error}"
        return None

    def codec(self, source_id: str) -> IngestCodec:
        """The persistent buffer stores gzipped ``/ingest`` bodies for this sink."""
        return IngestCodec(source_id)

    # Sending -------------------------------------------------------------
    def send_batch(self, batch: Batch) -> SendResult:
        """Send a stored body as it is; the points path handles what it cannot."""
        body = batch.body
        if body is None or batch.codec_tag != f"ingest:{self.source_id}" \
                or len(body) > MAX_BODY_BYTES:
            return self.send(batch.points, batch.key)
        self._require_key()
        status, error, count = self._post(body, batch.key, gzipped=True)
        if status == 200:
            return SendResult(self._stored(count, batch.count))
        if status in (400, 413):
            # A point to isolate, or a receiver with a lower limit: the points path
            # bisects and splits, under sub-keys of this batch's key.
            return self.send(batch.points, batch.key)
        raise self._failure(status, error)

    def _require_key(self) -> None:
        if self._api_key is None:
            raise AuthenticationError(
                "no API key: set the environment variable PLEXUS_API_KEY (or api_key in the "
                'rig file, {"api_key": ...} in ~/.plexus/config.json, or Plexus(api_key=...) '
                "in Python)"
            )

    @staticmethod
    def _stored(count: int, sent: int) -> int:
        if count == sent or count < 0:  # no count: a receiver that stores all
            return sent
        # The rate ceiling answered 200 but stored nothing: send again soon.
        raise RetryableSinkError(
            f"gateway stored {count} of {sent} points (per-source rate ceiling)",
            retry_after=random.uniform(0.05, 0.15),
        )

    @staticmethod
    def _failure(status: int, error: str) -> Exception:
        if status in (401, 403):
            return AuthenticationError(f"the gateway refused the API key ({status}: {error})")
        return RetryableSinkError(f"gateway answered {status}: {error}")

    def send(self, points: list[Point], key: str) -> SendResult:
        self._require_key()
        rejected: list[tuple[int, str]] = []
        delivered = 0
        indices = list(range(len(points)))
        for start in range(0, len(points), MAX_POINTS_PER_REQUEST):
            part = slice(start, start + MAX_POINTS_PER_REQUEST)
            suffix = "" if len(points) <= MAX_POINTS_PER_REQUEST else f".{start}"
            delivered += self._send_part(points[part], indices[part], key + suffix, rejected)
        return SendResult(delivered, rejected)

    def _send_part(
        self,
        points: list[Point],
        indices: list[int],
        key: str,
        rejected: list[tuple[int, str]],
    ) -> int:
        """Send ``points`` (their batch positions in ``indices``); return how many were stored."""
        if not points:
            return 0
        body = self.encode(points)
        if len(body) > MAX_BODY_BYTES and len(points) > 1:
            return self._send_halves(points, indices, key, rejected)
        status, error, count = self._post(body, key)
        if status == 200:
            return self._stored(count, len(points))
        if status == 413:
            if len(points) == 1:
                rejected.append((indices[0], f"413 {error}"))
                return 0
            return self._send_halves(points, indices, key, rejected)
        if status == 400:
            return self._isolate_bad_points(points, indices, key, rejected, error)
        raise self._failure(status, error)

    def _send_halves(
        self, points: list[Point], indices: list[int], key: str, rejected: list[tuple[int, str]]
    ) -> int:
        mid = len(points) // 2
        return self._send_part(points[:mid], indices[:mid], f"{key}.a", rejected) + \
            self._send_part(points[mid:], indices[mid:], f"{key}.b", rejected)

    def _isolate_bad_points(
        self,
        points: list[Point],
        indices: list[int],
        key: str,
        rejected: list[tuple[int, str]],
        error: str,
    ) -> int:
        match = _POINT_INDEX.search(error)
        bad = int(match.group(1)) if match else None
        if bad is not None and 0 <= bad < len(points):
            rejected.append((indices[bad], error))
            rest = points[:bad] + points[bad + 1:]
            rest_indices = indices[:bad] + indices[bad + 1:]
            return self._send_part(rest, rest_indices, f"{key}.x{bad}", rejected)
        if len(points) == 1:
            rejected.append((indices[0], error))
            return 0
        # The message names no point: bisect until the bad one is alone.
        return self._send_halves(points, indices, key, rejected)

    def encode(self, points: list[Point]) -> bytes:
        """The JSON body for ``points`` (not compressed)."""
        rows: list[dict[str, Any]] = []
        append = rows.append
        for metric, value, ts, tags in points:
            if tags:
                append({"metric": metric, "value": value, "timestamp": ts, "tags": tags})
            else:
                append({"metric": metric, "value": value, "timestamp": ts})
        return orjson.dumps({"source_id": self.source_id, "points": rows})

    def _post(self, body: bytes, key: str, gzipped: bool = False) -> tuple[int, str, int]:
        assert self._client is not None and self._api_key is not None, "open() first"
        headers = {"x-api-key": self._api_key.reveal(), "Idempotency-Key": key}
        opts: HttpSinkOptions = self.options
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        elif len(body) > opts.gzip_min_bytes:
            body = gzip_bytes(body, opts.gzip_level)
            headers["Content-Encoding"] = "gzip"
        self.requests += 1
        clock = self._clock
        sent = 0 if clock is None else clock.mono_ns()
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except self._http_error as exc:
            if not isinstance(exc, self._not_sent):
                self.record_sent(len(body))
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from exc
        self.record_sent(len(body))
        if clock is not None:
            _report_date(clock, response, sent)
        return response.status_code, *_parse_response(response)


def _report_date(clock: Clock, response: httpx.Response, sent_mono_ns: int) -> None:
    """The answer's Date (whole seconds, RFC 9110) was true between sending and now."""
    received = clock.mono_ns()
    value = response.headers.get("date")
    if not value:
        return
    from email.utils import parsedate_to_datetime  # imported at the first answer

    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        log.debug("unreadable Date header %r", value[:64])
        return
    if date.tzinfo is None:  # "-0000": UTC by RFC 5322
        date = date.replace(tzinfo=timezone.utc)
    clock.observe("http-date", int(date.timestamp()) * 1_000_000_000, sent_mono_ns, received,
                  resolution_ns=1_000_000_000)


def _parse_response(response: httpx.Response) -> tuple[str, int]:
    try:
        payload = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    error = str(payload.get("error") or response.reason_phrase or "")[:500]
    count = payload.get("count")
    return error, count if isinstance(count, int) else -1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
