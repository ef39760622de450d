"""The ``influxdb`` sink: InfluxDB line protocol over HTTP, gzip, millisecond precision.

``api: v1`` (the default) writes to ``{url}/write?db=...&rp=...&precision=ms``
(InfluxDB 1.x); ``api: v2`` writes to
``{url}/api/v2/write?org=...&bucket=...&precision=ms`` (InfluxDB 2.x and 3.x,
and 1.8+ where the bucket is ``database/retention_policy``). The same code
builds both; only the path, the query and the login differ.

Point to line
    By default the metric is the measurement and the value is the field
    ``value`` (``value_field``): ``engine.rpm,source_id=rig-01 value=3450 <ms>``.
    With ``measurement: telemetry`` every point goes to that one measurement
    and the metric becomes the field key. Object values become one field per
    member (``position x=1.2,y=3.4``; nested members and list items joined
    with ``.``: ``a.b``, ``joint.0``). The point's tags become tags, plus
    ``source_id`` (``source_tag``). Numbers are written as floats unless
    ``integers: integer``: InfluxDB fixes a field's type at its first write,
    and a feed that sends ``3`` one moment and ``3.5`` the next would
    otherwise have half its points refused.

Status handling
    - 204: delivered.
    - 400 / 422 (bad line, field type conflict, outside the retention
      policy): InfluxDB writes the good lines and refuses the bad ones without
      saying which, so the batch is split in halves until each refused point
      is alone; those are rejected (dropped, counted), the rest delivered.
      Writing a point again stores it once (same series, same time), so the
      split costs requests, never duplicates.
    - 401 / 403: :class:`AuthenticationError`; the data stays buffered.
    - 404 (database or bucket not found), 429, 5xx, timeouts and connection
      errors: retryable (429 and 503 honour ``Retry-After``).
    - 413: split in halves until the parts fit.

A point that line protocol cannot carry (a newline in a tag, a name ending in
a backslash, an object with no members) is rejected before sending.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from plexus.codec import gzip_bytes
from plexus.errors import AuthenticationError, InvalidOptions, RetryableSinkError
from plexus.optioncheck import declared_problems
from plexus.point import Point
from plexus.secret import Secret
from plexus.sinks.base import SendResult, Sink

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

USER_AGENT = "plexus-gateway/0.1"
_RETRY_AFTER_CAP = 60.0


@dataclass
class InfluxdbSinkOptions:
    """Options of the ``influxdb`` sink."""

    url: str = field(default="http://localhost:8086",
                     metadata={"help": "base URL of the InfluxDB server"})
    api: Literal["v1", "v2"] = field(
        default="v1",
        metadata={"help": "'v1': /write with database/retention_policy (InfluxDB 1.x); "
                  "'v2': /api/v2/write with bucket/org/token (2.x, 3.x, and 1.8+)"},
    )
    database: str | None = field(default=None, metadata={"help": "v1: the database (required)"})
    retention_policy: str | None = field(
        default=None, metadata={"help": "v1: the retention policy; None: the database's default"}
    )
    username: str | None = field(default=None, metadata={"help": "v1: user name (Basic auth)"})
    password: str | None = field(
        default=None, repr=False,
        metadata={"help": "v1: password, e.g. ${INFLUX_PASSWORD}; never logged", "secret": True},
    )
    bucket: str | None = field(
        default=None,
        metadata={"help": "v2: the bucket (required); on 1.8+ 'database/retention_policy'"},
    )
    org: str | None = field(default=None, metadata={"help": "v2: the organization name"})
    token: str | None = field(
        default=None, repr=False,
        metadata={"help": "API token sent as 'Authorization: Token ...' (v2; on 1.8+ also "
                  "'user:password'), e.g. ${INFLUX_TOKEN}; never logged", "secret": True},
    )
    measurement: str | None = field(
        default=None,
        metadata={"help": "None: the metric is the measurement; a name: every point goes to "
                  "that measurement with the metric as the field key"},
    )
    value_field: str = field(
        default="value", metadata={"help": "field key of the value when measurement is None"}
    )
    source_tag: str | None = field(
        default="source_id",
        metadata={"help": "tag carrying the gateway's source id; None: no such tag"},
    )
    integers: Literal["float", "integer"] = field(
        default="float",
        metadata={"help": "'float': numbers are written as floats (no type conflicts when a "
                  "feed mixes 3 and 3.5); 'integer': ints as InfluxDB integers (3i)"},
    )
    gzip: bool = field(default=True, metadata={"help": "gzip request bodies"})
    timeout: float = field(default=10.0, metadata={"help": "seconds per request", "gt": 0})
    verify_tls: bool = field(
        default=True, metadata={"help": "verify the server's TLS certificate (warns when off)"}
    )
    create_database: bool = field(
        default=False,
        metadata={"help": "v1: CREATE DATABASE at the first write (needs admin rights)"},
    )

    def __post_init__(self) -> None:
        # Declared limits were checked by the rig loader, each at its line; this holds
        # options built in Python to them too and adds the rules joining several fields.
        problems = declared_problems(self)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(("url", f"must be an http:// or https:// URL, got {self.url!r}"))
        if self.api == "v1":
            if not self.database:
                problems.append(("database", "api v1 needs database"))
            if self.bucket or self.org:
                problems.append(("api", "bucket and org are for api v2; v1 uses database and "
                                 "retention_policy"))
        else:
            if not self.bucket:
                problems.append(("bucket", "api v2 needs bucket"))
            if self.database or self.retention_policy or self.username or self.create_database:
                problems.append(("api", "database, retention_policy, username and "
                                 "create_database are for api v1; v2 uses bucket, org, token"))
        if self.password is not None and self.username is None:
            problems.append(("password", "is set without a username"))
        if self.username is not None and self.token is not None:
            problems.append(("token", "set username/password or token, not both"))
        for name in ("measurement", "value_field", "source_tag"):
            value = getattr(self, name)
            if value is not None and (not value or _unwritable(value)):
                problems.append((name, f"{value!r} cannot be written in line protocol "
                                 "(empty, a newline, or a trailing backslash)"))
        if problems:
            raise InvalidOptions(problems)


# Line protocol ---------------------------------------------------------------------


def _unwritable(name: str) -> bool:
    return "\n" in name or "\r" in name or name.endswith("\\")


_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})


class _Unwritable(Exception):
    """A point line protocol cannot carry; the message says why."""


class LineEncoder:
    """Turns points into InfluxDB line protocol, one ``bytes`` line per point.

    Parameters:
        options: the sink's options (measurement, value_field, source_tag, integers).
        source_id: the value of the ``source_tag`` tag.
    """

    def __init__(self, options: InfluxdbSinkOptions, source_id: str) -> None:
        self.measurement = options.measurement
        self.value_field = options.value_field
        self.integers = options.integers == "integer"
        self.source_tag = options.source_tag
        self.source_id = source_id
        self._tag_cache: dict[int, tuple[dict[str, str] | None, str]] = {}

    def line(self, point: Point) -> bytes:
        """The line for ``point`` (with its newline); raises _Unwritable."""
        metric, value, ts, tags = point
        if self.measurement is None:
            measurement, prefix = metric, None
        else:
            measurement, prefix = self.measurement, metric
        if _unwritable(measurement) or measurement.startswith("#"):
            raise _Unwritable(f"the measurement {measurement!r} cannot be written in line "
                              "protocol (a newline, a trailing backslash, or a leading '#')")
        fields: list[str] = []
        self._fields(prefix, value, fields)
        if not fields:
            raise _Unwritable("the value has no members to write as fields")
        return (f"{measurement.translate(_MEASUREMENT_ESCAPES)}{self._tags(tags)} "
                f"{','.join(fields)} {ts}\n").encode()

    def _tags(self, tags: dict[str, str] | None) -> str:
        # Tag dicts are shared by many points (the pipeline stamps one dict per
        # context), so their encoded form is cached by identity, with the dict
        # kept alive in the cache so the identity cannot be reused.
        cached = self._tag_cache.get(id(tags))
        if cached is not None and cached[0] is tags:
            return cached[1]
        merged = dict(tags or {})
        if self.source_tag is not None:
            merged.setdefault(self.source_tag, self.source_id)
        parts = []
        for key in sorted(merged):  # InfluxDB's recommended order
            val = merged[key]
            if not val:
                continue  # InfluxDB has no empty tag values; leaving it out is the same
            if _unwritable(key) or _unwritable(val):
                raise _Unwritable(f"tag {key!r}={val!r} cannot be written in line protocol "
                                  "(a newline or a trailing backslash)")
            parts.append(f",{key.translate(_KEY_ESCAPES)}={val.translate(_KEY_ESCAPES)}")
        text = "".join(parts)
        if len(self._tag_cache) >= 1024:
            self._tag_cache.clear()
        self._tag_cache[id(tags)] = (tags, text)
        return text

    def _fields(self, prefix: str | None, value: Any, out: list[str]) -> None:
        """Append ``key=value`` for ``value`` and, for objects and lists, each member.

        ``prefix`` None: the value of a point whose metric is the measurement,
        so a plain value is the field ``value_field`` and members are named alone.
        """
        kind = type(value)
        if kind is dict or kind is list:
            items = value.items() if kind is dict else enumerate(value)
            for member, item in items:
                self._fields(str(member) if prefix is None else f"{prefix}.{member}", item, out)
            return
        if value is None:
            return  # a null member of an object: nothing to write
        key = self.value_field if prefix is None else prefix
        if _unwritable(key):
            raise _Unwritable(f"field {key!r} cannot be written in line protocol")
        out.append(f"{key.translate(_KEY_ESCAPES)}={self._value(value)}")

    def _value(self, value: Any) -> str:
        kind = type(value)
        if kind is bool:
            return "true" if value else "false"
        if kind is int:
            return f"{value}i" if self.integers else repr(float(value))
        if kind is float:
            if not math.isfinite(value):
                raise _Unwritable("InfluxDB cannot store NaN or infinity")
            return repr(value)
        return f'"{str(value).translate(_STRING_ESCAPES)}"'


# The sink ----------------------------------------------------------------------------


class InfluxdbSink(Sink):
    """Write batches to InfluxDB over HTTP (line protocol, gzip, precision ms).

    Parameters:
        options: :class:`InfluxdbSinkOptions`.
        name: the sink's name in logs and status.
        transport: an ``httpx`` transport, for tests.
    """

    type_name: ClassVar[str] = "influxdb"
    Options: ClassVar[type] = InfluxdbSinkOptions

    def __init__(self, options: InfluxdbSinkOptions, name: str | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(options, name)
        self.options: InfluxdbSinkOptions = options
        base = options.url.rstrip("/")
        if options.api == "v1":
            self.url = f"{base}/write"
            self._params = {"db": options.database, "precision": "ms"}
            if options.retention_policy:
                self._params["rp"] = options.retention_policy
        else:
            self.url = f"{base}/api/v2/write"
            self._params = {"bucket": options.bucket, "precision": "ms"}
            if options.org:
                self._params["org"] = options.org
        self._auth: Secret | None = None
        if options.token is not None:
            self._auth = Secret(f"Token {options.token}")
        elif options.username is not None:
            login = f"{options.username}:{options.password or ''}".encode()
            self._auth = Secret("Basic " + base64.b64encode(login).decode())
        self._transport = transport
        self._client: httpx.Client | None = None
        self._http_error: type[Exception] = Exception
        self._not_sent: tuple[type[Exception], ...] = ()  # failures before any byte went out
        self._encoder: LineEncoder | None = None
        self._database_ready = not options.create_database
        self.requests = 0

    def __repr__(self) -> str:
        where = (f"database={self.options.database!r}" if self.options.api == "v1"
                 else f"bucket={self.options.bucket!r}")
        return f"InfluxdbSink(name={self.name!r}, url={self.url!r}, {where})"

    def open(self, source_id: str) -> None:
        opts = self.options
        self._encoder = LineEncoder(opts, source_id)
        if not opts.verify_tls:
            log.warning("TLS certificate verification is OFF for %s", self.url)
        import httpx  # imported here: `import plexus` must stay fast

        headers = {"User-Agent": USER_AGENT, "Content-Type": "text/plain; charset=utf-8"}
        self._client = httpx.Client(timeout=opts.timeout, verify=opts.verify_tls,
                                    transport=self._transport, headers=headers)
        self._http_error = httpx.HTTPError
        self._not_sent = (httpx.ConnectError, httpx.ConnectTimeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # Sending -------------------------------------------------------------
    def send(self, points: list[Point], key: str) -> SendResult:
        assert self._encoder is not None, "open() first"
        if not self._database_ready:
            self._create_database()
        rejected: list[tuple[int, str]] = []
        lines: list[bytes] = []
        indices: list[int] = []
        line = self._encoder.line
        for index, point in enumerate(points):
            try:
                lines.append(line(point))
            except _Unwritable as exc:
                rejected.append((index, str(exc)))
                continue
            indices.append(index)
        delivered = self._write(lines, indices, rejected) if lines else 0
        rejected.sort()
        return SendResult(delivered, rejected)

    def _write(self, lines: list[bytes], indices: list[int],
               rejected: list[tuple[int, str]]) -> int:
        """Write ``lines`` (batch positions in ``indices``); return how many were stored."""
        status, error, retry_after = self._post(b"".join(lines))
        if status in (200, 204):
            return len(lines)
        if status in (400, 413, 422):
            if len(lines) == 1:
                rejected.append((indices[0], f"{status} {error}"))
                return 0
            mid = len(lines) // 2
            return (self._write(lines[:mid], indices[:mid], rejected)
                    + self._write(lines[mid:], indices[mid:], rejected))
        if status in (401, 403):
            raise AuthenticationError(f"InfluxDB refused the credentials ({status}: {error})")
        if status == 404:
            raise RetryableSinkError(self._not_found(error))
        raise RetryableSinkError(f"InfluxDB answered {status}: {error}",
                                 retry_after=retry_after if status in (429, 503) else None)

    def _not_found(self, error: str) -> str:
        if self.options.api == "v2" and "page not found" in error:
            return ("InfluxDB answered 404 for /api/v2/write: this server has no v2 write "
                    "API (InfluxDB before 1.8); use api: v1")
        what = "database" if self.options.api == "v1" else "bucket"
        return f"InfluxDB: {error or 'not found'}; create the {what} (the data stays buffered)"

    def _post(self, body: bytes) -> tuple[int, str, float | None]:
        assert self._client is not None, "open() first"
        headers = {}
        if self._auth is not None:
            headers["Authorization"] = self._auth.reveal()
        if self.options.gzip:
            body = gzip_bytes(body, 1)
            headers["Content-Encoding"] = "gzip"
        self.requests += 1
        try:
            response = self._client.post(self.url, params=self._params, content=body,
                                         headers=headers)
        except self._http_error as exc:
            if not isinstance(exc, self._not_sent):
                self.record_sent(len(body))
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from exc
        self.record_sent(len(body))
        return response.status_code, _error_text(response), _retry_after(response)

    def _create_database(self) -> None:
        assert self._client is not None, "open() first"
        headers = {"Authorization": self._auth.reveal()} if self._auth is not None else {}
        name = (self.options.database or "").replace("\\", "\\\\").replace('"', '\\"')
        try:
            response = self._client.post(self.url.removesuffix("/write") + "/query",
                                         params={"q": f'CREATE DATABASE "{name}"'},
                                         headers=headers)
        except self._http_error as exc:
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise AuthenticationError(f"InfluxDB refused CREATE DATABASE "
                                      f"({response.status_code}: {_error_text(response)})")
        if response.status_code != 200:
            raise RetryableSinkError(f"InfluxDB answered {response.status_code} to CREATE "
                                     f"DATABASE: {_error_text(response)}")
        self._database_ready = True


def _error_text(response: httpx.Response) -> str:
    text = response.headers.get("X-Influxdb-Error")
    if not text:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            text = str(payload.get("error") or payload.get("message") or "")
        else:
            text = response.text.strip()
    return (text or response.reason_phrase or "")[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _RETRY_AFTER_CAP)
