"""A local, Plexus-compatible ingest receiver for tests and for trying a rig.

:class:`Receiver` is a real HTTP server on 127.0.0.1 that speaks the
platform's ``POST /ingest`` protocol exactly as PROTOCOL.md writes it down:
the same auth rules (401/403), the same body limits (5 MiB compressed and
decompressed, 413), gzip, the same per-point validation with errors that name
``points[i]``, and the same 200 body. It keeps what it accepted so a test can
assert what a user of the platform would see, and it can misbehave on purpose
(errors, slow answers, connection resets, going offline) to test retries.

In a test (the pytest plugin ``plexus.pytest_plugin`` provides the fixtures
``plexus_receiver`` and ``plexus_receiver_factory``)::

    from plexus import Plexus

    def test_delivers(plexus_receiver):
        with Plexus(api_key="plx_test", source_id="rig-01",
                    gateway_url=plexus_receiver.url) as px:
            px.send("motor.rpm", 3450)
        assert plexus_receiver.wait_for(1)
        assert plexus_receiver.metrics() == {"motor.rpm": [3450]}

Without pytest (a plugin's own test suite, a script)::

    from plexus.testing import Receiver

    with Receiver(api_keys=["plx_test"]) as rx:   # started, on a free port
        ...                                       # point the client at rx.url
        rx.wait_for(100, timeout=5.0)
        rx.points        # accepted points, source_id filled in, timestamp in ms
        rx.requests      # one RequestRecord per HTTP request
        rx.duplicates    # requests answered from the Idempotency-Key memory

Retry behaviour::

    rx.fail_next(2, status=503)          # two 503s, nothing stored
    rx.reject_keys_next(1)               # one 401 even with a good key
    rx.delay_next(1, 3.0)                # answer after 3 s (a client timeout);
                                         # the request is still processed
    rx.reset_next(1)                     # TCP RST before processing
    rx.reset_next(1, after_store=True)   # store, then RST: unknown outcome
    rx.go_down(); ...; rx.come_up()      # connection refused, same port after
    Receiver(rate_limit_interval=0.0005) # the gateway's per-source ceiling

Faults apply to ``POST /ingest`` requests only, each kind in the order the
calls were made. Within one request they act in this order: delay, reset
(before processing), fail, key rejection, normal processing, reset after
storing. So ``delay_next(1, 5)`` plus ``fail_next(1)`` gives a slow 503 that
stores nothing.

Trying a rig against a local receiver (logs each request, and each accepted
point unless ``--quiet``; without ``--api-key`` any non-empty key is accepted)::

    python -m plexus.testing --port 8080 --api-key plx_test
    plexus-gateway --config rig.yaml   # with gateway_url: http://127.0.0.1:8080

This module uses only the standard library and orjson and never imports
pytest, so it can be imported anywhere. It deliberately re-implements the
protocol's rules instead of reusing :mod:`plexus.point`: it is the independent
oracle the client is tested against, so a mistake in the client's validation
cannot hide itself here.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from typing import Any

import orjson

__all__ = ["RequestRecord", "Receiver", "main"]

# The limits of PROTOCOL.md, kept here on purpose rather than imported from
# plexus.point (see the module docstring).
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_POINTS = 10_000
MAX_SOURCE_ID_CHARS = 256
MAX_METRIC_CHARS = 256
MAX_STRING_VALUE_BYTES = 256
MAX_JSON_VALUE_BYTES = 4096
MAX_TAGS = 16
MAX_TAG_CHARS = 256
#: The real gateway admits one request per source every 0.5 ms.
GATEWAY_RATE_LIMIT_INTERVAL = 0.0005

# An oversized body is read and thrown away up to this size so the client
# receives the 413 instead of a reset (a server that closes with unread input
# makes the kernel send RST, which can overtake the response). Beyond it the
# connection is closed.
_DRAIN_LIMIT = 64 * 1024 * 1024
_READ_CHUNK = 256 * 1024
_SOURCE_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_SOURCE_ID_CHARS = _SOURCE_ID_FIRST | frozenset("._-")
_MISSING: Any = object()
_JSON_TYPE_NAMES = {
    dict: "object", list: "array", str: "string", int: "number", float: "number",
    bool: "boolean", type(None): "null",
}


@dataclass
class RequestRecord:
    """What the receiver saw of one HTTP request and how it answered.

    ``status`` is 0 when the connection was reset (or dropped while going
    down) instead of answered. ``count`` is the ``count`` of a 200 answer.
    ``points`` is the number of points in the body (0 when it could not be
    parsed). ``body_bytes`` is the size on the wire, ``decoded_bytes`` after
    gunzip. ``fault`` names the injected fault that shaped the answer:
    ``"delay"``, ``"reset"``, ``"fail"``, ``"reject_key"`` or
    ``"reset_after_store"``.
    """

    method: str
    path: str
    status: int = 0
    count: int = 0
    points: int = 0
    source_ids: tuple[str, ...] = ()
    idempotency_key: str | None = None
    gzip: bool = False
    body_bytes: int = 0
    decoded_bytes: int = 0
    duplicate: bool = False
    rate_limited: int = 0
    error: str | None = None
    fault: str | None = None
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    received_at: float = 0.0


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class _Reset(Exception):
    """Abort the request with a TCP reset instead of an answer."""


def _add_fault(rec: RequestRecord, name: str) -> None:
    rec.fault = f"{rec.fault},{name}" if rec.fault else name


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _bad(i: int, message: str) -> _HTTPError:
    return _HTTPError(400, f"points[{i}]: {message}")


def _check_source_id(i: int, sid: str) -> None:
    if len(sid) > MAX_SOURCE_ID_CHARS:
        raise _bad(i, f"source_id must be at most {MAX_SOURCE_ID_CHARS} characters, got {len(sid)}")
    if sid[0] not in _SOURCE_ID_FIRST or not _SOURCE_ID_CHARS.issuperset(sid):
        raise _bad(i, f"source_id {sid[:64]!r} must match ^[a-z0-9][a-z0-9._-]*$")


def _resolve_source_id(i: int, sid: Any, default: str | None) -> str:
    # The gateway treats an absent, null or empty per-point source_id as "use
    # the top-level one"; any other non-string is a mistake worth naming.
    if sid is None or sid == "":
        if not default:
            raise _bad(i, "source_id is required (set a top-level or per-point source_id)")
        return default
    raise _bad(i, f"source_id must be a string, got {_json_type(sid)}")


def _go_json_size(value: Any) -> int:
    # The gateway measures an object/array value with Go's json.Marshal, which
    # escapes <, > and & as \u003c (3 bytes more each) and U+2028/U+2029 as
    # \u2028 (3 bytes more each). Counting like that keeps this receiver from
    # accepting a value the platform would reject.
    data = orjson.dumps(value)
    size = len(data)
    if size > MAX_JSON_VALUE_BYTES // 7:  # below this even all-escaped text fits
        size += 5 * (data.count(b"<") + data.count(b">") + data.count(b"&"))
        size += 3 * (data.count(b"\xe2\x80\xa8") + data.count(b"\xe2\x80\xa9"))
    return size


def _check_tags(i: int, tags: Any) -> None:
    if type(tags) is not dict:
        raise _bad(i, f"tags must be an object of strings, got {_json_type(tags)}")
    if len(tags) > MAX_TAGS:
        raise _bad(i, f"tags may have at most {MAX_TAGS} entries, got {len(tags)}")
    for key, val in tags.items():
        if len(key) > MAX_TAG_CHARS:
            raise _bad(i, f"tag key {key[:40]!r}... must be at most {MAX_TAG_CHARS} characters")
        if type(val) is not str:
            raise _bad(i, f"tags[{key!r}] must be a string, got {_json_type(val)}")
        if len(val) > MAX_TAG_CHARS:
            raise _bad(i, f"tags[{key!r}] must be at most {MAX_TAG_CHARS} characters, got {len(val)}")


def _bad_value(i: int, cls: str, value: Any) -> _HTTPError:
    if value is _MISSING:
        return _bad(i, "value is required")
    if value is None:
        return _bad(i, "value must not be null")
    if cls == "metric":
        if type(value) is float:
            return _bad(i, f"value must be a finite number, got {value}")
        return _bad(i, f"value must be a finite number for class 'metric', got {_json_type(value)}")
    if type(value) is str:
        return _bad(i, f"value: a string may be at most {MAX_STRING_VALUE_BYTES} bytes of UTF-8, "
                       f"got {len(value.encode())}")
    if type(value) is dict or type(value) is list:
        return _bad(i, f"value: an object or array may be at most {MAX_JSON_VALUE_BYTES} bytes "
                       f"of JSON, got {_go_json_size(value)}")
    return _bad(i, f"value has unsupported type {_json_type(value)}")  # pragma: no cover


def _validate(
    points: list[Any],
    default_sid: str | None,
    now_ms: int,
    extra_check: Callable[[dict[str, Any]], str | None] | None,
) -> dict[str, list[dict[str, Any]]]:
    """Validate and normalize every point in place; return them grouped by source.

    Raises _HTTPError(400, "points[i]: ...") at the first bad point. This loop
    receives a million points in the benchmarks, so the common case takes the
    fewest possible branches and every error is built off the hot path.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, p in enumerate(points):
        if type(p) is not dict:
            raise _bad(i, f"a point must be an object, got {_json_type(p)}")
        sid = p.get("source_id")
        if type(sid) is not str or not sid:
            sid = _resolve_source_id(i, sid, default_sid)
            p["source_id"] = sid
        group = groups.get(sid)
        if group is None:
            _check_source_id(i, sid)
            group = groups[sid] = []
        value = p.get("value", _MISSING)
        kind = type(value)
        cls = p.get("class")
        if cls is None:
            # JSON true/false decode to bool, which `type(...) is int` excludes.
            cls = p["class"] = "metric" if kind is int or kind is float else "event"
        if cls == "metric":
            if kind is float:
                if value - value != 0.0:  # NaN or +-Inf
                    raise _bad_value(i, cls, value)
            elif kind is not int:
                raise _bad_value(i, cls, value)
        elif cls == "event":
            if kind is str:
                # 4 bytes per character at most, so short strings skip encoding.
                if len(value) > MAX_STRING_VALUE_BYTES // 4 and (
                    len(value.encode()) > MAX_STRING_VALUE_BYTES
                ):
                    raise _bad_value(i, cls, value)
            elif kind is dict or kind is list:
                if _go_json_size(value) > MAX_JSON_VALUE_BYTES:
                    raise _bad_value(i, cls, value)
            elif kind is not bool and kind is not int and kind is not float:
                raise _bad_value(i, cls, value)
        else:
            shown = cls if type(cls) is str else _json_type(cls)
            raise _bad(i, f"class must be 'metric' or 'event', got {shown!r}")
        metric = p.get("metric")
        if type(metric) is not str or not 0 < len(metric) <= MAX_METRIC_CHARS:
            got = len(metric) if type(metric) is str else _json_type(metric)
            raise _bad(i, f"metric must be 1..{MAX_METRIC_CHARS} characters, got {got}")
        ts = p.get("timestamp", _MISSING)
        if ts is _MISSING:
            p["timestamp"] = now_ms
        else:
            tkind = type(ts)
            if (tkind is not int and tkind is not float) or ts - ts != 0:
                got = str(ts) if tkind is float else _json_type(ts)
                raise _bad(i, f"timestamp must be a finite number, got {got}")
            if 0 < ts < 1e12:  # seconds, as the gateway reads it
                ts = ts * 1000
                # Keep whole milliseconds as int so tests compare with ints.
                p["timestamp"] = int(ts) if tkind is float and ts.is_integer() else ts
        tags = p.get("tags", _MISSING)
        if tags is not _MISSING:
            # Inlined: a call per point would cost more than the checks.
            if type(tags) is not dict or len(tags) > MAX_TAGS:
                _check_tags(i, tags)
            for key, val in tags.items():
                if type(val) is not str or len(val) > MAX_TAG_CHARS or len(key) > MAX_TAG_CHARS:
                    _check_tags(i, tags)
        if extra_check is not None:
            problem = extra_check(p)
            if problem:
                raise _bad(i, problem)
        group.append(p)
    return groups


def _group(points: list[Any], default_sid: str | None) -> dict[str, list[dict[str, Any]]]:
    """The validate=False path: only resolve each point's source."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, p in enumerate(points):
        sid = p.get("source_id") if type(p) is dict else None
        if type(sid) is not str or not sid:
            if not default_sid:
                raise _bad(i, "source_id is required (set a top-level or per-point source_id)")
            sid = default_sid
            if type(p) is dict:
                p["source_id"] = sid
        group = groups.get(sid)
        if group is None:
            group = groups[sid] = []
        group.append(p)
    return groups


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip (concatenated members too), never past ``limit`` + 1 bytes."""
    out: list[bytes] = []
    total = 0
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise _HTTPError(400, "invalid gzip body") from exc
        total += len(chunk)
        if total > limit:
            raise _HTTPError(413, f"payload too large (max {limit} bytes, decompressed)")
        out.append(chunk)
        if not inflater.eof:
            raise _HTTPError(400, "invalid gzip body (truncated)")
        data = inflater.unused_data
        if not data:
            return b"".join(out)


def _read_exact(rfile: BufferedIOBase, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) < n:
        raise ConnectionError("client closed the connection mid-body")
    return data


def _drain(rfile: BufferedIOBase, n: int) -> None:
    while n > 0:
        n -= len(_read_exact(rfile, min(n, _READ_CHUNK)))


def _read_chunked(rfile: BufferedIOBase, limit: int) -> tuple[bytes | None, int]:
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1024)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _HTTPError(400, "bad chunked encoding", close=True) from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields: ignored
            return (b"".join(parts) if total <= limit else None), total
        total += size
        if total > _DRAIN_LIMIT:
            raise _HTTPError(413, f"payload too large (max {limit} bytes)", close=True)
        if total > limit:
            parts.clear()
            _drain(rfile, size)
        else:
            parts.append(_read_exact(rfile, size))
        _read_exact(rfile, 2)  # the CRLF after each chunk


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients keep connections alive as they do with the platform;
    # every answer carries Content-Length for that reason.
    protocol_version = "HTTP/1.1"
    server_version = "plexus-testing"
    # Headers and body go out in one write, but a reset test must not wait
    # on Nagle either.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client (or go_down) closed the socket first
        finally:
            self.server.track(self.connection, False)

    def do_POST(self) -> None:
        self.server.receiver._serve(self)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the Receiver logs requests itself when asked to


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads of idle keep-alive connections must not block stop().
    block_on_close = False
    allow_reuse_address = True  # come_up() binds the same port again
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], receiver: Receiver) -> None:
        self.receiver = receiver
        # Set when going down: cuts injected delays short.
        self.closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._resets: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can
        # stall for seconds on a badly configured host; the name is unused.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def mark_reset(self, conn: socket.socket) -> None:
        # SO_LINGER with a zero timeout turns close() into a real RST.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conns_lock:
            self._resets.add(conn)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            # Skip shutdown(SHUT_WR): it would send a polite FIN before the RST.
            request.close()
        else:
            super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the handler thread's read
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients hanging up mid-request are routine here
        super().handle_error(request, client_address)


class Receiver:
    """A Plexus-compatible ``POST /ingest`` endpoint on a local port.

    Parameters:
        port: TCP port; 0 picks a free one (see :attr:`port` after start()).
        host: interface to listen on; keep the default for tests.
        api_keys: keys accepted in ``x-api-key`` (others get 401); ``None``
            accepts any non-empty key.
        forbidden_keys: keys answered with 403, as a key without the write
            scope or limited to another source.
        extra_check: called with each normalized point after the protocol's
            own checks; a returned string rejects the request with 400
            ``points[i]: <string>`` (a receiver with stricter limits).
        rate_limit_interval: emulate the gateway's per-source ceiling: a
            source's points arriving sooner than this many seconds after its
            last admitted request are dropped (200 with a lower ``count``).
            The platform uses :data:`GATEWAY_RATE_LIMIT_INTERVAL` (0.5 ms).
        store: keep accepted points in :attr:`points`; ``False`` keeps only
            counts (benchmarks).
        validate: run the per-point validation and normalization; ``False``
            only resolves each point's source_id and counts (benchmarks).
        max_body_bytes, max_points: the protocol's limits, lowerable to test a
            client's splitting without sending megabytes.
        log: called with one line per request (and per accepted point when
            ``log_points``); the command line uses ``print``.

    Raises:
        OSError: from :meth:`start` / :meth:`come_up` when the port is taken.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        api_keys: Iterable[str] | None = ("plx_test",),
        forbidden_keys: Iterable[str] = (),
        extra_check: Callable[[dict[str, Any]], str | None] | None = None,
        rate_limit_interval: float | None = None,
        store: bool = True,
        validate: bool = True,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_points: int = MAX_POINTS,
        log: Callable[[str], None] | None = None,
        log_points: bool = False,
    ) -> None:
        self.host = host
        self._port = port
        self.api_keys: frozenset[str] | None = None if api_keys is None else frozenset(api_keys)
        self.forbidden_keys = frozenset(forbidden_keys)
        self.extra_check = extra_check
        self.rate_limit_interval = rate_limit_interval
        self.store = store
        self.validate = validate
        self.max_body_bytes = max_body_bytes
        self.max_points = max_points
        self.log = log
        self.log_points = log_points
        #: Seconds to wait before answering every POST /ingest request.
        self.delay: float = 0.0

        # One condition guards all recorded state, so wait_for() wakes on it.
        self._cond = threading.Condition()
        self._points: list[dict[str, Any]] = []
        self._count = 0
        self._requests: list[RequestRecord] = []
        self._duplicates = 0
        self._rate_limited = 0
        self._seen_keys: dict[str, int] = {}
        self._last_admitted: dict[str, float] = {}

        self._faults = threading.Lock()
        self._fail: deque[tuple[int, str]] = deque()
        self._delays: deque[float] = deque()
        self._resets: deque[bool] = deque()
        self._reject_keys = 0

        self._state = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Receiver:
        """Listen and serve in a daemon thread; returns self. A no-op when running."""
        with self._state:
            if self._server is None:
                self._listen()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        with self._state:
            self._unlisten()

    def go_down(self) -> None:
        """Stop listening and drop open connections: clients see connection refused.

        Recorded state is kept; :meth:`come_up` listens again on the same port.
        """
        self.stop()

    def come_up(self) -> None:
        """Listen again on the same port after :meth:`go_down`."""
        if self._port == 0:
            raise RuntimeError("come_up() needs a receiver that has been started once")
        self.start()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self) -> None:
        server = _Server((self.host, self._port), self)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() may wait for the loop
            name=f"plexus-receiver-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.closing.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join()

    @property
    def running(self) -> bool:
        """True while listening."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port (known once started)."""
        if self._port == 0:
            raise RuntimeError("the receiver has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; clients append ``/ingest``."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        """A key this receiver accepts (for building a client in a test)."""
        if self.api_keys is None:
            return "plx_test"
        accepted = sorted(self.api_keys - self.forbidden_keys)
        if not accepted:
            raise RuntimeError("this receiver accepts no key")
        return "plx_test" if "plx_test" in accepted else accepted[0]

    # -- recorded state ------------------------------------------------------

    @property
    def points(self) -> list[dict[str, Any]]:
        """A copy of the accepted points, in arrival order (empty with store=False)."""
        with self._cond:
            return list(self._points)

    @property
    def count(self) -> int:
        """Number of points accepted and stored (counted even with store=False)."""
        return self._count

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the records of every request, in the order they were answered."""
        with self._cond:
            return list(self._requests)

    @property
    def duplicates(self) -> int:
        """Requests answered from the Idempotency-Key memory (stored nothing)."""
        return self._duplicates

    @property
    def rate_limited(self) -> int:
        """Points dropped by the emulated per-source rate ceiling."""
        return self._rate_limited

    def metrics(self) -> dict[str, list[Any]]:
        """Accepted values by metric name, in arrival order."""
        out: dict[str, list[Any]] = {}
        with self._cond:
            for p in self._points:
                metric = p.get("metric") if type(p) is dict else None
                if type(metric) is str:  # validate=False may have stored anything
                    out.setdefault(metric, []).append(p.get("value"))
        return out

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` points are stored; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests have been answered (or reset)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= n, timeout)

    def clear(self) -> None:
        """Forget points, requests, counters, idempotency keys and rate-limit state.

        Pending faults and configuration stay.
        """
        with self._cond:
            self._points.clear()
            self._requests.clear()
            self._count = self._duplicates = self._rate_limited = 0
            self._seen_keys.clear()
            self._last_admitted.clear()

    # -- fault injection -----------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, error: str = "injected") -> None:
        """Answer the next ``n`` requests with ``status`` and ``{"error": error}``."""
        with self._faults:
            self._fail.extend([(status, error)] * n)

    def delay_next(self, n: int, seconds: float) -> None:
        """Wait ``seconds`` before handling each of the next ``n`` requests.

        The request is then processed and stored as usual, as a slow gateway
        would: a client that timed out meanwhile cannot know it was stored.
        """
        with self._faults:
            self._delays.extend([seconds] * n)

    def reset_next(self, n: int = 1, after_store: bool = False) -> None:
        """Reset the TCP connection (RST, no answer) on the next ``n`` requests.

        With ``after_store`` the request is processed (stored when valid)
        first, so the client sees an error for data that did arrive.
        """
        with self._faults:
            self._resets.extend([after_store] * n)

    def reject_keys_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests 401 even when the key is good."""
        with self._faults:
            self._reject_keys += n

    def _take_start_faults(self) -> tuple[float, bool | None]:
        # A delay and a reset are decided when the request arrives; a reset
        # after storing still replaces whatever answer the request earns.
        with self._faults:
            delay = self._delays.popleft() if self._delays else self.delay
            reset = self._resets.popleft() if self._resets else None
        return delay, reset

    def _take_fail(self) -> tuple[int, str] | None:
        with self._faults:
            return self._fail.popleft() if self._fail else None

    def _take_reject(self) -> bool:
        # Consumed only by a request that reaches the key check, so a
        # fail_next() queued alongside does not swallow it.
        with self._faults:
            if self._reject_keys > 0:
                self._reject_keys -= 1
                return True
            return False

    # -- request handling ----------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        headers = h.headers
        rec = RequestRecord(
            method=h.command,
            path=h.path,
            idempotency_key=headers.get("Idempotency-Key"),
            api_key=headers.get("x-api-key"),
            headers=dict(headers.items()),
            received_at=time.time(),
        )
        status: int = 200
        payload: dict[str, Any] | None = None
        close = reset = False
        try:
            path = h.path.split("?", 1)[0]
            is_ingest = path == "/ingest" and h.command == "POST"
            if not is_ingest:
                self._read_body(h)  # keeps the connection usable for the next request
                if path != "/ingest":
                    raise _HTTPError(404, "not found")
                if h.command == "OPTIONS":
                    # The gateway answers CORS preflight for browser-side senders.
                    status = 204
                else:
                    raise _HTTPError(405, "method not allowed; use POST")
            else:
                body, rec.body_bytes = self._read_body(h)
                delay, reset_at = self._take_start_faults()
                if delay > 0:
                    _add_fault(rec, "delay")
                    if h.server.closing.wait(delay):
                        raise ConnectionError("receiver went down during an injected delay")
                if reset_at is False:
                    _add_fault(rec, "reset")
                    raise _Reset
                if reset_at is True:
                    _add_fault(rec, "reset_after_store")
                    reset = True
                payload = self._ingest(h, rec, body)
        except _Reset:
            reset = True
        except _HTTPError as exc:
            status, payload, close = exc.status, {"error": exc.message}, exc.close
            rec.error = exc.message
        except OSError:
            # The client hung up (or go_down closed the socket) mid-request.
            h.close_connection = True
            self._record(rec)
            return
        except Exception as exc:  # an extra_check that raised, or a bug here
            status, payload = 500, {"error": f"internal error: {exc!r}"}
            rec.error = payload["error"]
        rec.status = 0 if reset else status
        if reset:
            h.server.mark_reset(h.connection)
            h.close_connection = True
        self._record(rec)
        if not reset:
            self._answer(h, status, payload, close)

    def _record(self, rec: RequestRecord) -> None:
        with self._cond:
            self._requests.append(rec)
            self._cond.notify_all()
        if self.log is not None:
            sources = ",".join(rec.source_ids) or "-"
            line = (f"{rec.method} {rec.path} -> {rec.status or 'RESET'} "
                    f"points={rec.points} stored={rec.count} source={sources}")
            if rec.duplicate:
                line += " duplicate"
            if rec.fault:
                line += f" fault={rec.fault}"
            if rec.error:
                line += f" error={rec.error!r}"
            self.log(line)

    def _answer(self, h: _Handler, status: int, payload: Any, close: bool) -> None:
        body = b"" if payload is None else orjson.dumps(payload) + b"\n"
        reason = h.responses.get(status, ("",))[0]
        head = [
            f"HTTP/1.1 {status} {reason}",
            f"Date: {h.date_time_string()}",
            f"Content-Length: {len(body)}",
        ]
        if payload is not None:
            head.append("Content-Type: application/json")
        if status == 405:
            head.append("Allow: POST, OPTIONS")
        if h.command == "OPTIONS" and status == 204:
            head += ["Access-Control-Allow-Origin: *",
                     "Access-Control-Allow-Methods: POST, OPTIONS",
                     "Access-Control-Allow-Headers: Content-Type, x-api-key"]
        if close:
            head.append("Connection: close")
            h.close_connection = True
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if h.command != "HEAD":
            raw += body
        try:
            h.wfile.write(raw)
        except OSError:
            h.close_connection = True

    def _read_body(self, h: _Handler) -> tuple[bytes | None, int]:
        """Return (body, size on the wire); body is None when over the limit (drained)."""
        limit = self.max_body_bytes
        encoding = h.headers.get("Transfer-Encoding")
        if encoding and encoding.strip().lower() != "identity":
            if encoding.strip().lower() != "chunked":
                raise _HTTPError(501, f"unsupported Transfer-Encoding {encoding!r}", close=True)
            return _read_chunked(h.rfile, limit)
        length = h.headers.get("Content-Length")
        if length is None:
            return b"", 0
        try:
            n = int(length)
            if n < 0:
                raise ValueError(length)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length", close=True) from None
        if n > limit:
            if n > _DRAIN_LIMIT:
                raise _HTTPError(413, f"payload too large (max {limit} bytes)", close=True)
            _drain(h.rfile, n)
            return None, n
        return _read_exact(h.rfile, n), n

    def _ingest(self, h: _Handler, rec: RequestRecord, body: bytes | None) -> dict[str, Any]:
        fail = self._take_fail()
        if fail is not None:
            _add_fault(rec, "fail")
            raise _HTTPError(fail[0], fail[1])

        key = rec.api_key
        if not key:
            raise _HTTPError(401, "missing x-api-key")
        if self._take_reject():
            _add_fault(rec, "reject_key")
            raise _HTTPError(401, "invalid API key")
        if key in self.forbidden_keys:
            raise _HTTPError(403, "API key lacks write scope")
        if self.api_keys is not None and key not in self.api_keys:
            raise _HTTPError(401, "invalid API key")

        if body is None:
            raise _HTTPError(413, f"payload too large (max {self.max_body_bytes} bytes)")
        encoding = (h.headers.get("Content-Encoding") or "").strip().lower()
        if encoding == "gzip":
            rec.gzip = True
            body = _gunzip(body, self.max_body_bytes)
        elif encoding not in ("", "identity"):
            raise _HTTPError(400, f"unsupported Content-Encoding {encoding!r}; use gzip")
        rec.decoded_bytes = len(body)

        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _HTTPError(400, f"invalid JSON body: {exc}") from None
        if type(doc) is not dict:
            raise _HTTPError(400, f"invalid JSON body: expected an object, got {_json_type(doc)}")
        points = doc.get("points")
        if points is None:
            raise _HTTPError(400, "'points' array is required")
        if type(points) is not list:
            raise _HTTPError(400, f"'points' must be an array, got {_json_type(points)}")
        rec.points = len(points)
        if len(points) > self.max_points:
            raise _HTTPError(400, f"too many points: {len(points)} (max {self.max_points})")
        default_sid = doc.get("source_id")
        if default_sid is not None and type(default_sid) is not str:
            raise _HTTPError(400, f"source_id must be a string, got {_json_type(default_sid)}")

        now_ms = time.time_ns() // 1_000_000
        if self.validate:
            groups = _validate(points, default_sid, now_ms, self.extra_check)
        else:
            groups = _group(points, default_sid)
        rec.source_ids = tuple(groups)

        count = self._admit(rec, groups)
        answer: dict[str, Any] = {"success": True, "count": count}
        if len(groups) == 1:
            answer["source_id"] = rec.source_ids[0]
        return answer

    def _admit(self, rec: RequestRecord, groups: dict[str, list[dict[str, Any]]]) -> int:
        """Apply idempotency and the rate ceiling, store, and return the count."""
        idem = rec.idempotency_key
        interval = self.rate_limit_interval
        admitted: list[list[dict[str, Any]]] = []
        with self._cond:
            if idem is not None and idem in self._seen_keys:
                rec.duplicate = True
                rec.count = self._seen_keys[idem]
                self._duplicates += 1
                return rec.count
            count = 0
            now = time.monotonic()
            for sid, group in groups.items():
                if interval is not None:
                    last = self._last_admitted.get(sid)
                    if last is not None and now - last < interval:
                        rec.rate_limited += len(group)
                        continue
                    self._last_admitted[sid] = now
                admitted.append(group)
                count += len(group)
                if self.store:
                    self._points.extend(group)
            self._rate_limited += rec.rate_limited
            self._count += count
            rec.count = count
            if idem is not None and count > 0:
                self._seen_keys[idem] = count
            self._cond.notify_all()
        if self.log is not None and self.log_points:
            for group in admitted:
                for p in group:
                    tags = p.get("tags")
                    self.log(f"  {p.get('source_id')} {p.get('metric')} = {p.get('value')!r} "
                             f"@{p.get('timestamp')}" + (f" {tags}" if tags else ""))
        return count


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m plexus.testing``: run a receiver until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m plexus.testing",
        description="Run a local Plexus-compatible ingest receiver (POST /ingest).",
    )
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted key (repeatable); default: any non-empty key")
    parser.add_argument("--rate-limit", nargs="?", type=float, const=GATEWAY_RATE_LIMIT_INTERVAL,
                        default=None, metavar="SECONDS",
                        help="emulate the per-source rate ceiling (default interval 0.0005)")
    parser.add_argument("--quiet", action="store_true", help="no line per accepted point")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    receiver = Receiver(args.port, args.host, api_keys=args.api_keys,
                        rate_limit_interval=args.rate_limit, log=say,
                        log_points=not args.quiet)
    stop = threading.Event()
    with receiver:
        say(f"plexus test receiver listening on {receiver.url} (POST /ingest); Ctrl-C stops")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    say(f"stopped; {receiver.count} points stored from {len(receiver.requests)} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
