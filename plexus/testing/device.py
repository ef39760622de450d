"""The platform's device WebSocket, ``/ws/device``, served by the :class:`Receiver`.

Two generations, chosen with ``Receiver(ws_generation=...)``:

``"hosted"`` (default)
    The hosted platform as the official SDK 0.16 speaks to it: the
    ``authenticated`` reply carries ``protocol: 1``, ``max_frame_bytes`` and
    ``acks: true``; commands go out as ``command_run``; every
    ``command_status`` is acknowledged with ``command_status_ack`` (unless
    ``auto_ack`` is off); ``typed_command`` works too.

``"oss"``
    The open-source gateway: ``authenticated`` has exactly ``type``,
    ``source_id`` and ``server_time_ms``; only ``typed_command`` is sent;
    ``command_status`` and ``command_sync`` draw ``INVALID_MESSAGE``
    ``unknown message type``.

Both check the first frame as the platform does (``device_auth`` with a
string ``api_key`` and a valid ``source_id``, else an ``error`` frame with
``message`` and close 1008 ``auth failed``; a first frame that is not JSON
closes 1008 without an error frame; 10 s of silence drops the TCP connection
without a close frame), read at most 1 MiB per message (close 1009 beyond),
keep one connection per source id (a new one evicts the old without a close
frame), and charge control frames to a token bucket (60, refilled 20 a
second, in the open-source generation; 2,000 a second hosted), answering
``RATE_LIMITED`` when it is empty.

Every frame a device sends is recorded (:attr:`DeviceServer.frames`), and a
test injects commands with :meth:`DeviceServer.run` (declared, waits for the
final status) or :meth:`DeviceServer.call` (legacy, waits for the result),
or over HTTP as the open-source gateway's ``POST /internal/command`` (and
``POST /internal/run``, the declared equivalent).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from plexus.testing.http import Handler

GENERATIONS = ("hosted", "oss")
MAX_MESSAGE_BYTES = 1024 * 1024
_SOURCE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_DEVICE_TYPES = frozenset({"telemetry", "video_frame", "heartbeat", "device_error", "pong",
                           "command_result"})
_HOSTED_TYPES = frozenset({"command_status", "command_sync"})


@dataclass
class DeviceFrame:
    """One frame a device sent: its connection number, source id, the decoded
    JSON object (None for binary or non-JSON text) and the raw message."""

    connection: int
    source_id: str | None
    frame: dict[str, Any] | None
    raw: str | bytes
    at: float
    rate_limited: bool = False

    @property
    def type(self) -> str | None:
        return self.frame.get("type") if self.frame else None


@dataclass
class RunResult:
    """The statuses a device sent for one ``command_run``, in arrival order."""

    run_id: str
    statuses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any] | None:
        for status in self.statuses:
            if status.get("state") in ("succeeded", "failed"):
                return status
        return None

    @property
    def state(self) -> str | None:
        final = self.final
        return final.get("state") if final else None

    @property
    def result(self) -> Any:
        return (self.final or {}).get("result")

    @property
    def error_code(self) -> str | None:
        return (self.final or {}).get("error_code")

    @property
    def error_message(self) -> str | None:
        return (self.final or {}).get("error_message")

    @property
    def states(self) -> list[str]:
        return [s.get("state", "?") for s in self.statuses]


@dataclass
class LegacyResult:
    """The ``command_result`` frames a device sent for one ``typed_command``."""

    id: str
    frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def events(self) -> list[str]:
        return [f.get("event", "?") for f in self.frames]

    @property
    def final(self) -> dict[str, Any] | None:
        for frame in self.frames:
            if frame.get("event") in ("result", "error"):
                return frame
        return None

    @property
    def result(self) -> Any:
        return (self.final or {}).get("result")

    @property
    def error(self) -> str | None:
        return (self.final or {}).get("error")


class _Bucket:
    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens = capacity
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _Device:
    """One authenticated connection."""

    def __init__(self, number: int, source_id: str, conn: Any, sock: Any,
                 bucket: _Bucket) -> None:
        self.number = number
        self.source_id = source_id
        self.conn = conn
        self.sock = sock
        self.bucket = bucket


class DeviceServer:
    """The ``/ws/device`` endpoint of one :class:`~plexus.testing.Receiver`.

    Parameters:
        api_keys: accepted keys, as the receiver's (None: any key).
        forbidden_keys: keys refused with ``API key lacks write scope``.
        generation: ``"hosted"`` or ``"oss"``.
        auth_timeout: seconds to wait for ``device_auth``.
        max_frame_bytes: announced in the hosted ``authenticated`` reply.
        store_results: when False, the hosted reply says ``store_results: false``.
        control_limit: ``(burst, per second)`` of the control-frame bucket;
            default (60, 20) for "oss", (2000, 2000) for "hosted"; None in a
            tuple turns the limit off.
    """

    def __init__(self, *, api_keys: frozenset[str] | None, forbidden_keys: frozenset[str],
                 generation: str = "hosted", auth_timeout: float = 10.0,
                 max_frame_bytes: int = 65536, store_results: bool = True,
                 control_limit: tuple[float, float] | None = None,
                 internal_secret: str | None = None) -> None:
        if generation not in GENERATIONS:
            raise ValueError(f"ws_generation must be one of {GENERATIONS}, got {generation!r}")
        self.generation = generation
        self.api_keys = api_keys
        self.forbidden_keys = forbidden_keys
        self.auth_timeout = auth_timeout
        self.max_frame_bytes = max_frame_bytes
        self.store_results = store_results
        self.control_limit = control_limit or ((60, 20) if generation == "oss" else (2000, 2000))
        self.internal_secret = internal_secret
        #: Acknowledge every command_status at once (hosted only).
        self.auto_ack = True
        #: Added to ``server_time_ms`` in the reply: a platform clock ahead (or behind).
        self.clock_skew_ms = 0
        self._cond = threading.Condition()
        self._frames: list[DeviceFrame] = []
        self._devices: dict[str, _Device] = {}
        self._connections = 0
        self._auths: list[dict[str, Any]] = []
        self._refuse_next = 0
        self._silent_next = 0
        self.rate_limited = 0

    # -- what a test reads --------------------------------------------------

    @property
    def frames(self) -> list[DeviceFrame]:
        """Every frame devices sent after authenticating, in arrival order."""
        with self._cond:
            return list(self._frames)

    @property
    def auths(self) -> list[dict[str, Any]]:
        """Every first frame (``device_auth``) received, accepted or not."""
        with self._cond:
            return list(self._auths)

    @property
    def connections(self) -> int:
        """WebSocket connections opened so far."""
        return self._connections

    def connected(self, source_id: str | None = None) -> bool:
        with self._cond:
            return bool(self._devices) if source_id is None else source_id in self._devices

    def wait_connected(self, source_id: str | None = None, timeout: float = 10.0,
                       connections: int | None = None) -> bool:
        """Block until a device (that one) is authenticated, and with ``connections``
        until at least that many connections were opened in all."""
        def ready() -> bool:
            if connections is not None and self._connections < connections:
                return False
            return bool(self._devices) if source_id is None else source_id in self._devices

        with self._cond:
            return self._cond.wait_for(ready, timeout)

    def wait_frame(self, predicate: Callable[[DeviceFrame], bool], timeout: float = 10.0,
                   count: int = 1) -> list[DeviceFrame]:
        """Block until ``count`` recorded frames satisfy ``predicate``; return them
        (fewer on timeout)."""
        def found() -> list[DeviceFrame]:
            return [f for f in self._frames if predicate(f)]

        with self._cond:
            self._cond.wait_for(lambda: len(found()) >= count, timeout)
            return found()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The decoded frames of one type, in arrival order."""
        return [f.frame for f in self.frames if f.frame and f.frame.get("type") == kind]

    def statuses(self, run_id: str) -> list[dict[str, Any]]:
        return [f for f in self.of_type("command_status") if f.get("run_id") == run_id]

    def clear(self) -> None:
        with self._cond:
            self._frames.clear()
            self._auths.clear()

    # -- faults ---------------------------------------------------------------

    def refuse_auth_next(self, n: int = 1) -> None:
        """Refuse the next ``n`` device_auth frames (error frame + close 1008)."""
        with self._cond:
            self._refuse_next += n

    def ignore_auth_next(self, n: int = 1) -> None:
        """Never answer the next ``n`` device_auth frames (the client must time out)."""
        with self._cond:
            self._silent_next += n

    def close(self, code: int = 1000, reason: str = "", source_id: str | None = None) -> None:
        """Say goodbye: a close frame with ``code`` to that device (or every one)."""
        for device in self._targets(source_id):
            try:
                device.conn.close(code, reason)
            except Exception:
                pass

    def drop(self, source_id: str | None = None) -> None:
        """Cut the TCP connection without a close frame (as an eviction does)."""
        for device in self._targets(source_id):
            _cut(device.sock)

    def send_raw(self, message: str | bytes, source_id: str | None = None) -> None:
        """Send any text or binary message (garbage, oversized, unknown types)."""
        self._device(source_id).conn.send(message)

    def send_frame(self, frame: dict[str, Any], source_id: str | None = None) -> None:
        self.send_raw(orjson.dumps(frame).decode(), source_id)

    def ping(self, payload: bytes = b"plexus", source_id: str | None = None,
             timeout: float = 5.0) -> bool:
        """Send a protocol ping; True when the pong with the same payload came back."""
        event = self._device(source_id).conn.ping(payload)
        return bool(event.wait(timeout))

    # -- injecting commands -------------------------------------------------------

    def send_command(self, command: str, params: dict[str, Any] | None = None,
                     source_id: str | None = None, command_id: str | None = None) -> str:
        """Send a legacy ``typed_command``; returns its id."""
        cid = command_id or str(uuid.uuid4())
        self.send_frame({"type": "typed_command", "id": cid, "command": command,
                         "params": {} if params is None else params}, source_id)
        return cid

    def call(self, command: str, params: dict[str, Any] | None = None,
             source_id: str | None = None, timeout: float = 10.0) -> LegacyResult:
        """Send a ``typed_command`` and wait for its ``result`` or ``error``."""
        cid = self.send_command(command, params, source_id)
        return self.wait_legacy(cid, timeout)

    def wait_legacy(self, command_id: str, timeout: float = 10.0) -> LegacyResult:
        def frames() -> list[dict[str, Any]]:
            return [f.frame for f in self._frames if f.frame is not None
                    and f.frame.get("type") == "command_result"
                    and f.frame.get("id") == command_id]

        with self._cond:
            self._cond.wait_for(
                lambda: any(f.get("event") in ("result", "error") for f in frames()), timeout)
            return LegacyResult(command_id, frames())

    def send_run(self, command: str, params: dict[str, Any] | None = None, *,
                 source_id: str | None = None, ttl_ms: Any = 30000, run_id: str | None = None,
                 attempt: int = 1, extra: dict[str, Any] | None = None) -> str:
        """Send a declared ``command_run``; returns its run id. ``ttl_ms=None``
        leaves the field out."""
        rid = run_id or str(uuid.uuid4())
        frame: dict[str, Any] = {"type": "command_run", "run_id": rid, "command": command,
                                 "params": {} if params is None else params,
                                 "attempt": attempt}
        if ttl_ms is not None:
            frame["ttl_ms"] = ttl_ms
        frame.update(extra or {})
        self.send_frame(frame, source_id)
        return rid

    def run(self, command: str, params: dict[str, Any] | None = None, *,
            source_id: str | None = None, ttl_ms: Any = 30000, run_id: str | None = None,
            attempt: int = 1, timeout: float = 10.0) -> RunResult:
        """Send a ``command_run`` and wait for its final status (``succeeded`` or ``failed``)."""
        rid = self.send_run(command, params, source_id=source_id, ttl_ms=ttl_ms,
                            run_id=run_id, attempt=attempt)
        return self.wait_run(rid, timeout)

    def wait_run(self, run_id: str, timeout: float = 10.0, after_seq: int = 0) -> RunResult:
        """Wait until ``run_id`` has a final status with a seq above ``after_seq``."""
        def final() -> bool:
            return any(s.get("state") in ("succeeded", "failed") and s.get("seq", 0) > after_seq
                       for s in self.statuses(run_id))

        with self._cond:
            self._cond.wait_for(final, timeout)
        return RunResult(run_id, self.statuses(run_id))

    def internal_command(self, body: Any, secret: str | None) -> tuple[int, Any]:
        """``POST /internal/command`` (and ``/internal/run`` with ``declared``)."""
        return self._internal(body, secret, declared=False)

    def internal_run(self, body: Any, secret: str | None) -> tuple[int, Any]:
        return self._internal(body, secret, declared=True)

    def _internal(self, body: Any, secret: str | None, declared: bool) -> tuple[int, Any]:
        if self.internal_secret is not None and secret != self.internal_secret:
            return 401, "unauthorized"
        try:
            doc = orjson.loads(body or b"")
        except orjson.JSONDecodeError:
            return 400, "invalid JSON"
        if not isinstance(doc, dict) or ("params" in doc and not isinstance(doc["params"], dict)):
            return 400, "invalid JSON"
        source_id, name = doc.get("source_id"), doc.get("command")
        if not source_id or not name or (not declared and not doc.get("org_id")):
            return 400, ("org_id, source_id, command required" if not declared
                         else "source_id, command required")
        if not self.connected(source_id):
            return 200, {"queued": False}
        try:
            if declared:
                rid = self.send_run(name, doc.get("params") or {}, source_id=source_id,
                                    ttl_ms=doc.get("ttl_ms", 30000), run_id=doc.get("run_id"))
                return 200, {"queued": True, "run_id": rid}
            cid = self.send_command(name, doc.get("params") or {}, source_id)
        except Exception:
            return 200, {"queued": False}
        return 200, {"queued": True, "id": cid}

    # -- serving ----------------------------------------------------------------

    def _targets(self, source_id: str | None) -> list[_Device]:
        with self._cond:
            if source_id is None:
                return list(self._devices.values())
            device = self._devices.get(source_id)
            return [device] if device else []

    def _device(self, source_id: str | None) -> _Device:
        with self._cond:
            if source_id is not None:
                device = self._devices.get(source_id)
            else:
                device = max(self._devices.values(), key=lambda d: d.number, default=None)
        if device is None:
            raise RuntimeError(f"no device connected{f' as {source_id!r}' if source_id else ''}")
        return device

    def serve(self, h: Handler) -> None:
        """Upgrade the request ``h`` to a WebSocket and run the device session."""
        from websockets.server import ServerProtocol
        from websockets.sync.connection import Connection

        h.close_connection = True
        raw = (h.requestline + "\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in h.headers.items()) + "\r\n")
        protocol = ServerProtocol(max_size=MAX_MESSAGE_BYTES,
                                  logger=logging.getLogger("plexus.testing.device"))
        protocol.receive_data(raw.encode("latin-1"))
        events = protocol.events_received()
        if not events:
            return
        request = events[0]
        response = protocol.accept(request)  # type: ignore[arg-type]
        protocol.send_response(response)
        try:
            h.wfile.write(b"".join(protocol.data_to_send()))
            h.wfile.flush()
        except OSError:
            return
        if response.status_code != 101:
            return
        sock = h.connection
        conn = Connection(sock, protocol, ping_interval=None, close_timeout=2.0)
        with self._cond:
            self._connections += 1
            number = self._connections
        device = self._authenticate(conn, sock, number)
        if device is None:
            return
        try:
            self._session(device)
        finally:
            with self._cond:
                if self._devices.get(device.source_id) is device:
                    del self._devices[device.source_id]
                self._cond.notify_all()

    def _authenticate(self, conn: Any, sock: Any, number: int) -> _Device | None:
        from websockets.exceptions import ConnectionClosed

        try:
            first = conn.recv(timeout=self.auth_timeout)
        except TimeoutError:
            _cut(sock)  # the platform gives up without a close frame
            return None
        except ConnectionClosed:
            return None
        try:
            doc = orjson.loads(first)
        except orjson.JSONDecodeError:
            conn.close(1008, "auth failed")
            return None
        with self._cond:
            self._auths.append(doc if isinstance(doc, dict) else {"raw": doc})
            silent = self._silent_next > 0
            self._silent_next -= 1 if silent else 0
            refuse = not silent and self._refuse_next > 0
            self._refuse_next -= 1 if refuse else 0
            self._cond.notify_all()
        if silent:
            try:
                conn.recv()  # until the client gives up
            except ConnectionClosed:
                pass
            return None
        source_id = doc.get("source_id") if isinstance(doc, dict) else None
        key = doc.get("api_key") if isinstance(doc, dict) else None
        message = None
        if (not isinstance(doc, dict) or doc.get("type") != "device_auth"
                or not isinstance(key, str) or not isinstance(source_id, str)
                or not 0 < len(source_id.encode()) <= 256 or not _SOURCE_ID.match(source_id)):
            message = "first message must be device_auth"
        elif refuse or (self.api_keys is not None and key not in self.api_keys):
            message = "Invalid API key"
        elif key in self.forbidden_keys:
            message = "API key lacks write scope"
        if message is not None:
            try:
                conn.send(orjson.dumps({"type": "error", "message": message}).decode())
                conn.close(1008, "auth failed")
            except ConnectionClosed:
                pass
            return None
        assert isinstance(source_id, str)
        burst, rate = self.control_limit
        device = _Device(number, source_id, conn, sock, _Bucket(burst, rate))
        with self._cond:
            old = self._devices.get(source_id)
            self._devices[source_id] = device
            self._cond.notify_all()
        if old is not None:
            _cut(old.sock)  # the new connection takes over; the old one sees 1006
        reply: dict[str, Any] = {"type": "authenticated", "source_id": source_id,
                                 "server_time_ms": time.time_ns() // 1_000_000 + self.clock_skew_ms}
        if self.generation == "hosted":
            reply.update({"protocol": 1, "max_frame_bytes": self.max_frame_bytes, "acks": True})
            if not self.store_results:
                reply["store_results"] = False
        try:
            conn.send(orjson.dumps(reply).decode())
        except ConnectionClosed:
            return None
        return device

    def _session(self, device: _Device) -> None:
        from websockets.exceptions import ConnectionClosed

        conn = device.conn
        while True:
            try:
                message = conn.recv()
            except ConnectionClosed:
                return
            self._on_message(device, message)

    def _on_message(self, device: _Device, message: str | bytes) -> None:
        frame: dict[str, Any] | None = None
        reply: dict[str, Any] | None = None
        if isinstance(message, str):
            try:
                value = orjson.loads(message)
            except orjson.JSONDecodeError:
                reply = {"type": "error", "code": "INVALID_JSON"}
            else:
                if isinstance(value, dict):
                    frame = value
                else:
                    reply = {"type": "error", "code": "INVALID_MESSAGE",
                             "detail": "message must be an object"}
        record = DeviceFrame(device.number, device.source_id, frame, message, time.time())
        if frame is not None:
            kind = frame.get("type")
            known = kind in _DEVICE_TYPES or kind == "device_auth" or (
                self.generation == "hosted" and kind in _HOSTED_TYPES)
            if not isinstance(kind, str):
                reply = {"type": "error", "code": "INVALID_MESSAGE",
                         "detail": "type must be a string"}
            elif not known:
                reply = {"type": "error", "code": "INVALID_MESSAGE",
                         "detail": "unknown message type"}
            elif kind != "telemetry" and not device.bucket.take():
                record.rate_limited = True
                self.rate_limited += 1
                reply = {"type": "error", "code": "RATE_LIMITED"}
            elif kind == "command_status" and self.auto_ack:
                reply = {"type": "command_status_ack", "run_id": frame.get("run_id"),
                         "seq": frame.get("seq")}
        with self._cond:
            self._frames.append(record)
            self._cond.notify_all()
        if reply is not None:
            try:
                device.conn.send(orjson.dumps(reply).decode())
            except Exception:
                pass


def _cut(sock: Any) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
