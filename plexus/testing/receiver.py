"""The :class:`Receiver`: a Plexus-compatible ``POST /ingest`` endpoint with fault injection."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from plexus.testing.device import DeviceServer
from plexus.testing.http import (
    DRAIN_LIMIT,
    Handler,
    Server,
    drain,
    gunzip,
    read_chunked,
    read_exact,
)
from plexus.testing.rules import (
    MAX_BODY_BYTES,
    MAX_POINTS,
    HTTPError,
    group_points,
    json_type,
    validate_points,
)


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



class _Reset(Exception):
    """Abort the request with a TCP reset instead of an answer."""


def _add_fault(rec: RequestRecord, name: str) -> None:
    rec.fault = f"{rec.fault},{name}" if rec.fault else name


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
        ws_generation: the device WebSocket (``/ws/device``, same port) speaks
            as the hosted platform (``"hosted"``, declared commands) or the
            open-source gateway (``"oss"``, legacy commands only); see
            :mod:`plexus.testing.device`. The endpoint is :attr:`device`.
        ws_auth_timeout: seconds the device WebSocket waits for ``device_auth``.
        ws_max_frame_bytes, ws_store_results: what the hosted ``authenticated``
            reply announces.
        ws_control_limit: ``(burst, per second)`` of device control frames.
        internal_secret: required in ``x-internal-secret`` by
            ``POST /internal/command`` and ``/internal/run`` when set.

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
        ws_generation: str = "hosted",
        ws_auth_timeout: float = 10.0,
        ws_max_frame_bytes: int = 65536,
        ws_store_results: bool = True,
        ws_control_limit: tuple[float, float] | None = None,
        internal_secret: str | None = None,
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
        #: The device WebSocket endpoint: inject commands, read back frames.
        self.device = DeviceServer(
            api_keys=self.api_keys, forbidden_keys=self.forbidden_keys,
            generation=ws_generation, auth_timeout=ws_auth_timeout,
            max_frame_bytes=ws_max_frame_bytes, store_results=ws_store_results,
            control_limit=ws_control_limit, internal_secret=internal_secret,
        )

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
        self._server: Server | None = None
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
        server = Server((self.host, self._port), self)
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
    def ws_url(self) -> str:
        """Base URL of the device WebSocket, e.g. ``ws://127.0.0.1:54321``
        (clients append ``/ws/device``)."""
        return f"ws://{self.host}:{self.port}"

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

    def _serve(self, h: Handler) -> None:
        headers = h.headers
        route = h.path.split("?", 1)[0]
        if route == "/ws/device" and h.command == "GET" \
                and (headers.get("Upgrade") or "").lower() == "websocket":
            self.device.serve(h)
            return
        if route in ("/internal/command", "/internal/run") and h.command == "POST":
            self._serve_internal(h, route)
            return
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
                    raise HTTPError(404, "not found")
                if h.command == "OPTIONS":
                    # The gateway answers CORS preflight for browser-side senders.
                    status = 204
                else:
                    raise HTTPError(405, "method not allowed; use POST")
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
        except HTTPError as exc:
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

    def _serve_internal(self, h: Handler, route: str) -> None:
        try:
            body, _ = self._read_body(h)
        except HTTPError as exc:
            self._answer(h, exc.status, {"error": exc.message}, True)
            return
        secret = h.headers.get("x-internal-secret")
        if route == "/internal/command":
            status, payload = self.device.internal_command(body, secret)
        else:
            status, payload = self.device.internal_run(body, secret)
        if isinstance(payload, str):  # the open-source gateway answers errors as text/plain
            data = (payload + "\n").encode()
            head = (f"HTTP/1.1 {status} {h.responses.get(status, ('',))[0]}\r\n"
                    f"Content-Type: text/plain; charset=utf-8\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n")
            try:
                h.wfile.write(head.encode("latin-1") + data)
            except OSError:
                h.close_connection = True
            return
        self._answer(h, status, payload, False)

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

    def _answer(self, h: Handler, status: int, payload: Any, close: bool) -> None:
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

    def _read_body(self, h: Handler) -> tuple[bytes | None, int]:
        """Return (body, size on the wire); body is None when over the limit (drained)."""
        limit = self.max_body_bytes
        encoding = h.headers.get("Transfer-Encoding")
        if encoding and encoding.strip().lower() != "identity":
            if encoding.strip().lower() != "chunked":
                raise HTTPError(501, f"unsupported Transfer-Encoding {encoding!r}", close=True)
            return read_chunked(h.rfile, limit)
        length = h.headers.get("Content-Length")
        if length is None:
            return b"", 0
        try:
            n = int(length)
            if n < 0:
                raise ValueError(length)
        except ValueError:
            raise HTTPError(400, "bad Content-Length", close=True) from None
        if n > limit:
            if n > DRAIN_LIMIT:
                raise HTTPError(413, f"payload too large (max {limit} bytes)", close=True)
            drain(h.rfile, n)
            return None, n
        return read_exact(h.rfile, n), n

    def _ingest(self, h: Handler, rec: RequestRecord, body: bytes | None) -> dict[str, Any]:
        fail = self._take_fail()
        if fail is not None:
            _add_fault(rec, "fail")
            raise HTTPError(fail[0], fail[1])

        key = rec.api_key
        if not key:
            raise HTTPError(401, "missing x-api-key")
        if self._take_reject():
            _add_fault(rec, "reject_key")
            raise HTTPError(401, "invalid API key")
        if key in self.forbidden_keys:
            raise HTTPError(403, "API key lacks write scope")
        if self.api_keys is not None and key not in self.api_keys:
            raise HTTPError(401, "invalid API key")

        if body is None:
            raise HTTPError(413, f"payload too large (max {self.max_body_bytes} bytes)")
        encoding = (h.headers.get("Content-Encoding") or "").strip().lower()
        if encoding == "gzip":
            rec.gzip = True
            body = gunzip(body, self.max_body_bytes)
        elif encoding not in ("", "identity"):
            raise HTTPError(400, f"unsupported Content-Encoding {encoding!r}; use gzip")
        rec.decoded_bytes = len(body)

        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"invalid JSON body: {exc}") from None
        if type(doc) is not dict:
            raise HTTPError(400, f"invalid JSON body: expected an object, got {json_type(doc)}")
        points = doc.get("points")
        if points is None:
            raise HTTPError(400, "'points' array is required")
        if type(points) is not list:
            raise HTTPError(400, f"'points' must be an array, got {json_type(points)}")
        rec.points = len(points)
        if len(points) > self.max_points:
            raise HTTPError(400, f"too many points: {len(points)} (max {self.max_points})")
        default_sid = doc.get("source_id")
        if default_sid is not None and type(default_sid) is not str:
            raise HTTPError(400, f"source_id must be a string, got {json_type(default_sid)}")

        now_ms = time.time_ns() // 1_000_000
        if self.validate:
            groups = validate_points(points, default_sid, now_ms, self.extra_check)
        else:
            groups = group_points(points, default_sid)
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

