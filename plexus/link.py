"""The device link: one WebSocket to the platform's ``/ws/device`` that carries commands.

The link authenticates (``device_auth`` first, nothing else before the
reply), keeps itself alive (a ``heartbeat`` frame every 30 s; the library
answers the server's pings), reconnects with backoff, and passes every JSON
frame it receives to a :class:`~plexus.commands.CommandCenter`. It knows
commands only as frames in and statuses out, and nothing of adapters, sinks
or buffers: telemetry never travels on it (see docs/architecture.md).

Reconnecting: a server close frame is a goodbye (reconnect after 0.1 to
0.5 s); any other end, an auth failure included, waits ``min(2**n, 60)``
seconds +-25 % (never under 0.1 s), where ``n`` counts failures since the
last successful authentication.

Outgoing frames are paced below the server's per-connection budget for
control frames (the open-source gateway allows a burst of 60 and 20 a
second; the hosted platform, announcing ``protocol: 1``, about 2,000 a
second), so a flood of command results is delivered late rather than dropped.

The WebSocket library (``websockets``) is imported when the link first
connects: a client that only sends telemetry never loads it.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from plexus.commands import CommandCenter
from plexus.errors import ConfigError, PlexusError
from plexus.point import validate_source_id
from plexus.secret import Secret

log = logging.getLogger(__name__)

DEFAULT_WS_URL = "wss://gateway.plexus.company"
DEVICE_PATH = "/ws/device"
#: The largest frame either side sends or accepts.
MAX_FRAME_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
AUTH_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 30.0
#: How long a connection's end waits for its writer, which may be stuck in a send.
WRITER_JOIN_S = 2.0
#: A clock further off the platform's than this draws a warning.
CLOCK_WARN_S = 3.0
#: A connection ending this soon after auth, three times running, suggests an evictor.
SHORT_LIVED_S = 10.0
EVICTION_STREAK = 3
MAX_ATTEMPT = 10
# (burst, per second) for control frames: the open-source gateway's bucket is
# 60 and 20/s; keep a margin. The hosted platform allows 2,000/s.
OSS_PACE = (50, 18.0)
HOSTED_PACE = (500, 500.0)

_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$")


def device_url(base: str) -> str:
    """``base`` without a trailing ``/``, with ``/ws/device`` appended unless present.

    Raises:
        ConfigError: the URL is not ``ws://`` or ``wss://``.
    """
    url = base.strip().rstrip("/")
    if not url.lower().startswith(("ws://", "wss://")):
        raise ConfigError(f"the device link URL must start with ws:// or wss://, got {base!r}")
    return url if url.endswith(DEVICE_PATH) else url + DEVICE_PATH


def check_link_source_id(source_id: str) -> str:
    """The source id, if the device link accepts it.

    Raises:
        ConfigError: it breaks ``^[a-z0-9][a-z0-9._-]*$``, is over 256
            characters, or is shaped like a UUID (the platform keeps those for
            its own ids).
    """
    try:
        validate_source_id(source_id)
    except PlexusError as exc:
        raise ConfigError(str(exc)) from None
    if _UUID.match(source_id):
        raise ConfigError(
            f"source_id {source_id!r} looks like a UUID, which the device link refuses (the "
            "platform uses UUIDs for its own ids): choose a name such as 'pod-07'")
    return source_id


def reconnect_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect number ``attempt`` (0-based) after a failure."""
    source: Any = rng or random
    return max(0.1, min(2.0 ** attempt, 60.0) * source.uniform(0.75, 1.25))


def goodbye_delay(rng: random.Random | None = None) -> float:
    """Seconds to wait after the server said goodbye (a close frame)."""
    return (rng or random).uniform(0.1, 0.5)


class _AuthRefused(Exception):
    pass


class _Pace:
    """A token bucket for outgoing frames."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens = float(burst)
        self.at = time.monotonic()

    def delay(self) -> float:
        """Seconds until a frame may go (0: take a token now)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class DeviceLink:
    """The WebSocket to ``/ws/device``, kept open in a background thread.

    Parameters:
        url: the base or full URL (``wss://gateway.plexus.company``).
        api_key: the platform key; never logged.
        source_id: checked with :func:`check_link_source_id`.
        center: where command frames go and statuses come from.
        agent_version, platform: sent in ``device_auth``.
        verify_tls: verify the server's certificate (``wss://``).
        wait: waits between reconnects; returns True to stop. Tests inject
            one to skip the delays; default: a wait that :meth:`stop` cuts short.
        rng: randomness of the backoff jitter.
        heartbeat_interval, auth_timeout, connect_timeout: seconds.
        clock: a :class:`~plexus.clock.Clock` that takes the platform's
            ``server_time_ms`` as a time reference (docs/time.md).

    Raises:
        ConfigError: a bad URL or source id.
    """

    def __init__(
        self,
        url: str,
        api_key: Secret | None,
        source_id: str,
        center: CommandCenter,
        *,
        agent_version: str = "0",
        platform: str = "plexus-gateway",
        verify_tls: bool = True,
        wait: Callable[[float], bool] | None = None,
        rng: random.Random | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        auth_timeout: float = AUTH_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        clock: Any = None,
    ) -> None:
        self.url = device_url(url)
        self.source_id = check_link_source_id(source_id)
        self.center = center
        self.agent_version = agent_version
        self.platform = platform
        self.verify_tls = verify_tls
        self.heartbeat_interval = heartbeat_interval
        self.auth_timeout = auth_timeout
        self.connect_timeout = connect_timeout
        self._api_key = api_key
        self._clock = clock
        self._auth_sent = 0  # the clock's monotonic time when device_auth went out
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._wait = wait or self._stopping.wait
        self._thread: threading.Thread | None = None
        self._ws: Any = None
        self._out: deque[bytes] = deque()
        self._out_cond = threading.Condition()
        self._up = False
        self._pace = _Pace(*OSS_PACE)
        self._attempt = 0
        self._reannounce = False
        self._announced = -1
        self._short_lived = 0
        self._evict_warned = False
        self._last_problem: str | None = None
        self._started = time.monotonic()
        #: "off", "connecting", "up", "waiting" (to reconnect), "stopped".
        self.state = "off"
        #: Seconds to add to this computer's clock to get the platform's, or None.
        self.clock_offset: float | None = None
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.hosted = False
        self.connections = 0
        self.reconnects = 0
        self.frames_in = 0
        self.frames_out = 0
        self.ignored = 0
        self.server_errors = 0
        #: The most recent reconnect delays, newest last (for status and tests).
        self.delays: deque[float] = deque(maxlen=64)

    def __repr__(self) -> str:
        return (f"DeviceLink(url={self.url!r}, source_id={self.source_id!r}, "
                f"state={self.state!r}, api_key={self._api_key!r})")

    # Control -------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; returns at once. A no-op when running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self.state = "connecting"
        self._thread = threading.Thread(target=self._main, name="plexus-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (a polite close frame) and stop reconnecting."""
        self._stopping.set()
        self._drop(polite=True)
        with self._out_cond:
            self._out_cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def reannounce(self) -> None:
        """Reconnect at once so that ``device_auth`` carries the current commands."""
        if self._up and self.center.version != self._announced:
            self._reannounce = True
            self._drop(polite=True)

    @property
    def up(self) -> bool:
        """True while authenticated."""
        return self._up

    def wait_up(self, timeout: float = 10.0) -> bool:
        """Block until authenticated (True) or ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        while not self._up and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.01)
        return self._up

    def send(self, frame: Mapping[str, Any]) -> bool:
        """Queue a frame for the server; False (nothing queued) while not authenticated."""
        if not self._up:
            return False
        try:
            data = orjson.dumps(frame, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            log.error("a %s frame could not be encoded and was dropped: %s",
                      frame.get("type"), exc)
            return False
        if len(data) > MAX_FRAME_BYTES:
            log.error("a %s frame of %d bytes was not sent: the link carries at most %d",
                      frame.get("type"), len(data), MAX_FRAME_BYTES)
            return False
        with self._out_cond:
            if not self._up:
                return False
            self._out.append(data)
            self._out_cond.notify()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state, "url": self.url,
            "since": self.connected_since, "reconnects": self.reconnects,
            "clock_offset": self.clock_offset, "last_error": self.last_error,
        }

    # The connection thread ------------------------------------------------
    def _main(self) -> None:
        while not self._stopping.is_set():
            self.state = "connecting"
            goodbye = False
            authed_at: float | None = None
            try:
                with self._connect() as ws:
                    self._ws = ws
                    try:
                        self._authenticate(ws)
                        authed_at = time.monotonic()
                        goodbye = self._serve(ws)
                    finally:
                        self._detach()
                        self._drop(polite=False)
            except Exception as exc:
                # stop() closing the socket ends whatever was going on: no problem to report.
                if not self._stopping.is_set():
                    self._problem(f"the platform refused the device link: {exc}"
                                  if isinstance(exc, _AuthRefused)
                                  else f"device link to {self.url} failed: {_describe(exc)}")
            if self._stopping.is_set():
                break
            self.reconnects += 1
            if authed_at is not None:
                self._check_eviction(time.monotonic() - authed_at)
            if self._reannounce:
                self._reannounce = False
                delay = 0.0
            elif goodbye:
                delay = goodbye_delay(self._rng)
            else:
                delay = reconnect_delay(self._attempt, self._rng)
                self._attempt = min(self._attempt + 1, MAX_ATTEMPT)
            self.delays.append(delay)
            self.state = "waiting"
            if delay and self._wait(delay):
                break
        self.state = "stopped"

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        from plexus import __version__

        ssl_context = None
        if self.url.lower().startswith("wss://") and not self.verify_tls:
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        ws = connect(  # used as a context manager by the caller
            self.url,
            open_timeout=self.connect_timeout,
            close_timeout=2.0,
            max_size=MAX_FRAME_BYTES,
            ping_interval=None,  # the server pings; we send heartbeat frames
            user_agent_header=f"plexus-gateway/{__version__}",
            ssl=ssl_context,
        )
        self.connections += 1
        return ws

    def _authenticate(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        auth: dict[str, Any] = {
            "type": "device_auth",
            "api_key": self._api_key.reveal() if self._api_key is not None else "",
            "source_id": self.source_id,
            "platform": self.platform,
            "agent_version": self.agent_version,
            "protocol": 1,
            "hears_goodbye": True,
            "acks": True,
        }
        self._announced = self.center.version
        manifest = self.center.manifest()
        if manifest:
            auth["commands"] = manifest
        if self._clock is not None:
            self._auth_sent = self._clock.mono_ns()
        ws.send(orjson.dumps(auth).decode())
        try:
            raw = ws.recv(timeout=self.auth_timeout)
        except TimeoutError:
            raise _AuthRefused(f"no answer to device_auth within {self.auth_timeout:g} s") \
                from None
        except ConnectionClosed as exc:
            raise _AuthRefused(f"closed during authentication ({_close_text(exc)})") from None
        reply = _json_object(raw)
        if reply is None or reply.get("type") != "authenticated":
            if reply is not None and reply.get("type") == "error":
                text = reply.get("message") or reply.get("detail") or reply.get("code")
                raise _AuthRefused(str(text)[:200])
            raise _AuthRefused(f"unexpected first reply {str(raw)[:80]!r}")
        self._on_authenticated(reply)

    def _on_authenticated(self, reply: dict[str, Any]) -> None:
        self._attempt = 0
        self.hosted = reply.get("protocol") == 1
        self._pace = _Pace(*(HOSTED_PACE if self.hosted else OSS_PACE))
        server_ms = reply.get("server_time_ms")
        if isinstance(server_ms, (int, float)) and not isinstance(server_ms, bool) \
                and server_ms > 0:
            offset = (server_ms - time.time() * 1000.0) / 1000.0
            self.clock_offset = offset
            if self._clock is not None and getattr(self._clock, "platform_time", False):
                # The server stamped its reply between our device_auth and this moment;
                # the clock judges the difference (and says so) itself.
                self._clock.observe("device-link", int(server_ms) * 1_000_000,
                                    self._auth_sent, self._clock.mono_ns(),
                                    resolution_ns=1_000_000)
            elif abs(offset) > CLOCK_WARN_S:
                log.warning("this computer's clock is %.1f s %s the platform's; timestamps it "
                            "makes are off by as much (set up NTP, e.g. systemd-timesyncd or "
                            "chrony)", abs(offset), "behind" if offset > 0 else "ahead of")
        replay = self.center.attach(self.send, reply, self._enable)
        with self._out_cond:
            # command_sync and the kept statuses go before anything else.
            for frame in reversed(replay):
                self._out.appendleft(orjson.dumps(frame, option=orjson.OPT_NON_STR_KEYS))
            self._out_cond.notify()
        self.connected_since = time.time()
        self.state = "up"
        self.last_error = None
        if self._last_problem is not None:
            log.info("device link to %s is up again", self.url)
            self._last_problem = None
        else:
            log.info("device link to %s is up (%s protocol)", self.url,
                     "hosted" if self.hosted else "legacy")
        if self.center.version != self._announced:
            self.reannounce()  # a command was declared while device_auth was on its way

    def _enable(self) -> None:
        with self._out_cond:
            self._out.clear()
            self._up = True

    def _detach(self) -> None:
        with self._out_cond:
            self._up = False
            self._out.clear()
            self._out_cond.notify_all()
        self.center.detach()
        self.connected_since = None

    def _serve(self, ws: Any) -> bool:
        """Read until the connection ends; True when the server said goodbye."""
        from websockets.exceptions import ConnectionClosed

        writer = threading.Thread(target=self._write, args=(ws,), name="plexus-link-writer",
                                  daemon=True)
        writer.start()
        try:
            while not self._stopping.is_set():
                try:
                    raw = ws.recv()
                except ConnectionClosed as exc:
                    # A close frame from the server is a goodbye: stop writing at once.
                    with self._out_cond:
                        self._up = False
                    if self._stopping.is_set() or self._reannounce:
                        return False
                    if exc.rcvd is not None:
                        self.last_error = f"server closed the link ({_close_text(exc)})"
                        log.info("device link: %s; reconnecting", self.last_error)
                        return True
                    self._problem(f"device link to {self.url} dropped ({_close_text(exc)})")
                    return False
                self._on_frame(raw)
        finally:
            with self._out_cond:
                self._up = False
                self._out_cond.notify_all()
            writer.join(WRITER_JOIN_S)
        return False

    def _on_frame(self, raw: Any) -> None:
        self.frames_in += 1
        frame = _json_object(raw) if isinstance(raw, str) else None
        if frame is None:
            self.ignored += 1  # binary frames, non-JSON text: ignored, never fatal
            return
        kind = frame.get("type")
        if kind == "error":
            self.server_errors += 1
            log.warning("the platform answered a frame with an error: %s %s",
                        frame.get("code") or "", frame.get("detail") or frame.get("message")
                        or "")
            return
        if kind in ("authenticated", "telemetry_ack", "pong"):
            return
        try:
            handled = self.center.handle(frame)
        except Exception:  # a bug in a command must never take the link down
            log.exception("handling a %s frame failed", kind)
            return
        if not handled:
            self.ignored += 1
            log.debug("ignored a frame of unknown type %r", kind)

    def _write(self, ws: Any) -> None:
        from plexus import __version__

        next_heartbeat = time.monotonic() + self.heartbeat_interval
        while True:
            with self._out_cond:
                while self._up and not self._out and time.monotonic() < next_heartbeat:
                    self._out_cond.wait(max(0.0, next_heartbeat - time.monotonic()))
                if not self._up:
                    return
                if self._out:
                    data = self._out.popleft()
                else:
                    next_heartbeat = time.monotonic() + self.heartbeat_interval
                    data = orjson.dumps({
                        "type": "heartbeat", "source_id": self.source_id,
                        "agent_version": __version__,
                        "uptime_s": round(time.monotonic() - self._started, 1),
                    })
            pause = self._pace.delay()
            while pause > 0:
                if self._stopping.wait(pause) or not self._up:
                    return
                pause = self._pace.delay()
            try:
                ws.send(data.decode())
            except Exception as exc:  # the reader notices the closed connection
                log.debug("device link: send failed: %s", exc)
                return
            self.frames_out += 1

    def _drop(self, polite: bool) -> None:
        ws = self._ws
        if ws is None:
            return
        if not polite:
            self._ws = None
        try:
            ws.close()
        except Exception as exc:
            log.debug("device link: close failed: %s", exc)

    # Reporting -------------------------------------------------------------
    def _problem(self, message: str) -> None:
        self.last_error = message
        # One line per distinct problem: a link that stays down does not fill the log.
        if message != self._last_problem:
            log.warning("%s; retrying with backoff", message)
            self._last_problem = message
        else:
            log.debug("%s", message)

    def _check_eviction(self, lifetime: float) -> None:
        if lifetime >= SHORT_LIVED_S * 6:
            self._short_lived = 0
            self._evict_warned = False
            return
        if lifetime >= SHORT_LIVED_S:
            return
        self._short_lived += 1
        if self._short_lived >= EVICTION_STREAK and not self._evict_warned:
            self._evict_warned = True
            log.warning(
                "the platform closed the device link %d times within %g s of opening it: "
                "another process is probably connected with source_id %r (the platform keeps "
                "one link per source id, so each evicts the other); give each process its own "
                "source_id", self._short_lived, SHORT_LIVED_S, self.source_id)


def _json_object(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, (str, bytes)):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _close_text(exc: Any) -> str:
    frame = getattr(exc, "rcvd", None)
    if frame is None:
        return "no close frame"
    reason = f": {frame.reason}" if frame.reason else ""
    return f"close {frame.code}{reason}"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
