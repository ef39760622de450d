"""Plexus: the embedded client, a source you call by hand plus the pipeline it owns.

Settings are resolved, highest priority first:

- API key: ``api_key=``, ``PLEXUS_API_KEY``, ``~/.plexus/config.json`` ``api_key``.
- source id: ``source_id=``, ``PLEXUS_SOURCE_ID``, config file ``source_id``,
  else a generated ``source-xxxxxxxx`` saved to the config file.
- gateway URL: ``gateway_url=``, ``PLEXUS_GATEWAY_URL``, config file
  ``gateway_url``, else ``https://gateway.plexus.company``.
- device link URL (remote commands only): ``ws_url=``,
  ``PLEXUS_GATEWAY_WS_URL``, config file ``gateway_ws_url``, else
  ``wss://gateway.plexus.company``; never derived from the gateway URL.

The config file's location can be moved with ``PLEXUS_CONFIG``.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from plexus.adapters.callable import CallableAdapter, CallableOptions
from plexus.batching import BatchSender
from plexus.buffer import DEFAULT_MAX_POINTS, WHEN_FULL, Buffer, MemoryBuffer
from plexus.clock import Clock
from plexus.commands import CommandCenter, declare
from plexus.errors import (  # noqa: F401 - the SDK's names, importable from plexus.client too
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    PlexusError,
    PointTypeError,
    RateLimitedError,
)
from plexus.pipeline import Pipeline, SourceContext
from plexus.point import check_metric, normalize_value, validate_source_id
from plexus.sdk_compat import (
    RetryConfig,
    note_ignored_endpoint,
    positional_arguments,
    unsupported,
)
from plexus.secret import Secret
from plexus.sinks.http import DEFAULT_GATEWAY_URL, HttpSink, HttpSinkOptions
from plexus.uploader import RetryPolicy

log = logging.getLogger(__name__)

_live_clients: weakref.WeakSet[Plexus] = weakref.WeakSet()


def config_path() -> Path:
    """Where the user's settings live: ``$PLEXUS_CONFIG`` or ``~/.plexus/config.json``."""
    return Path(os.environ.get("PLEXUS_CONFIG") or Path.home() / ".plexus" / "config.json")


def read_user_config(path: Path | None = None) -> dict[str, Any]:
    """Read the user's config file; missing → ``{}``; unreadable → warning and ``{}``."""
    path = path or config_path()
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s: expected a JSON object", path)
        return {}
    if data.get("api_key"):
        warn_if_shared(path)
    return data


def warn_if_shared(path: Path) -> None:
    """Warn when a file holding the API key can be read by other users."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s holds an API key and is readable by other users; run: chmod 600 %s",
                    path, path)


def _save_user_config(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def resolve_source_id(source_id: str | None, file_config: dict[str, Any], path: Path) -> str:
    chosen = source_id or os.environ.get("PLEXUS_SOURCE_ID") or file_config.get("source_id")
    if chosen:
        try:
            return validate_source_id(chosen)
        except PlexusError as exc:
            raise ConfigError(str(exc)) from None
    generated = f"source-{secrets.token_hex(4)}"
    try:
        _save_user_config(path, {**read_user_config(path), "source_id": generated})
        log.info("generated source_id %s and saved it to %s", generated, path)
    except OSError as exc:
        log.warning("could not save the generated source_id to %s: %s", path, exc)
    return generated


def _sdk_settings(
    retry: RetryPolicy | None, retry_config: RetryConfig | None,
    max_buffer_points: int | None, max_buffer_size: int | None,
) -> tuple[RetryPolicy | None, int | None]:
    """Fold the official SDK's ``retry_config``/``max_buffer_size`` into ours."""
    if retry_config is not None:
        if not isinstance(retry_config, RetryConfig):
            raise ConfigError(f"retry_config must be a plexus.RetryConfig, got "
                              f"{type(retry_config).__name__}")
        if retry is not None:
            raise ConfigError("give retry= or retry_config=, not both")
        retry = retry_config.to_policy()
    if max_buffer_size is not None:
        if max_buffer_points is not None and max_buffer_points != max_buffer_size:
            raise ConfigError(f"max_buffer_size={max_buffer_size} and max_buffer_points="
                              f"{max_buffer_points} name the same cap; give one")
        max_buffer_points = max_buffer_size
    return retry, max_buffer_points


class Plexus:
    """Send readings to the Plexus platform.

    ``send()`` validates the point, buffers it and returns ``True`` at once; a
    background thread uploads batches. Use it as a context manager, or call
    :meth:`close`, so buffered points are delivered before the program ends.

    Parameters:
        api_key: the platform API key (see the module docstring for fallbacks).
        source_id: the id of this device/source.
        gateway_url: base URL of the platform.
        tags: tags added to every point.
        persistent_buffer: keep points in SQLite until delivered (survives
            crashes and restarts) instead of in memory.
        buffer_path: the SQLite file; default ``~/.plexus/buffer/<source_id>.db``.
        max_buffer_points: buffer cap (default 10,000 in memory; on disk no
            practical limit, ``max_buffer_bytes`` governs).
        max_buffer_bytes: persistent buffer only: cap on stored bytes
            (compressed), default 2 GiB.
        when_full: what a full buffer does: ``"block"`` (default) makes
            ``send()`` wait for room while the platform is accepting data, and
            drop the oldest points only while delivery fails (an outage);
            ``"drop_oldest"`` never waits.
        batch_size: this many waiting points start an upload at once.
        flush_interval: otherwise upload every this many seconds.
        retry: the backoff policy (default 3 retries, 1 s, 2 s, 4 s, +-25%).
        timeout: seconds per HTTP request.
        close_timeout: how long :meth:`close` may take to deliver what is buffered.
        verify_tls: verify the server certificate (a warning is logged when off).
        sync_interval: persistent buffer only: seconds between fsyncs, i.e.
            the most a power cut can lose.
        transport: an ``httpx`` transport, for tests.
        sleep: the retry clock, for tests.
        ws_url: the device link (remote commands), opened only once a command
            is declared; see :meth:`command`.
        clock: stamps points sent without a timestamp and decides when the
            system clock can be trusted (a :class:`plexus.clock.Clock`; default
            one on the system clock). See docs/time.md.
        endpoint, retry_config, max_buffer_size: the official SDK's names
            (docs/migrating.md): ``endpoint`` (its web app's URL, for test
            runs) is accepted and ignored, ``retry_config`` (a
            :class:`~plexus.RetryConfig`) is another way to give ``retry``,
            ``max_buffer_size`` another name for ``max_buffer_points``.
        agent_metrics: send this client's own health as ``plexus.agent.*``
            points (dropped, rejected, buffered, delivered, retries, upload
            lag) every 60 s (``True``) or every that many seconds; off by
            default. See docs/operations.md.

    Positional arguments after ``api_key`` are ``(source_id, gateway_url)``,
    or the SDK's ``(endpoint, source_id, timeout, retry_config,
    max_buffer_size, persistent_buffer, buffer_path, ws_url)`` when the
    second is a URL (a source id never contains ``://``): ``Plexus(key,
    "rig-01")`` and the SDK's ``Plexus(key, "https://...", "rig-01")`` both
    send as ``rig-01``.

    Raises:
        ConfigError: an invalid ``source_id``, ``gateway_url`` or option, or
            the same setting given under both names with different values.
        TypeError: too many positional arguments, or one also given by name.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *args: Any,
        source_id: str | None = None,
        gateway_url: str | None = None,
        tags: dict[str, str] | None = None,
        persistent_buffer: bool = False,
        buffer_path: str | os.PathLike[str] | None = None,
        max_buffer_points: int | None = None,
        max_buffer_bytes: int | None = None,
        when_full: str = "block",
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        close_timeout: float = 5.0,
        verify_tls: bool = True,
        sync_interval: float = 1.0,
        transport: Any = None,
        sleep: Callable[[float], object] | None = None,
        ws_url: str | None = None,
        clock: Clock | None = None,
        endpoint: str | None = None,
        retry_config: RetryConfig | None = None,
        max_buffer_size: int | None = None,
        agent_metrics: bool | float = False,
    ) -> None:
        if args:
            fixed = positional_arguments(args, {
                "source_id": source_id, "gateway_url": gateway_url, "endpoint": endpoint,
                "timeout": timeout, "retry_config": retry_config,
                "max_buffer_size": max_buffer_size, "persistent_buffer": persistent_buffer,
                "buffer_path": buffer_path, "ws_url": ws_url,
            }, Plexus.__init__.__kwdefaults__ or {})
            source_id, gateway_url, endpoint = (fixed["source_id"], fixed["gateway_url"],
                                                fixed["endpoint"])
            timeout, retry_config, max_buffer_size = (fixed["timeout"], fixed["retry_config"],
                                                      fixed["max_buffer_size"])
            persistent_buffer, buffer_path, ws_url = (fixed["persistent_buffer"],
                                                      fixed["buffer_path"], fixed["ws_url"])
        retry, max_buffer_points = _sdk_settings(retry, retry_config, max_buffer_points,
                                                 max_buffer_size)
        #: The official SDK's ``endpoint`` (its web app): kept, never used.
        self.endpoint = endpoint
        if endpoint is not None:
            note_ignored_endpoint(endpoint)
        path = config_path()
        file_config = read_user_config(path)
        key = api_key or os.environ.get("PLEXUS_API_KEY") or file_config.get("api_key")
        self._api_key = Secret(key) if key else None
        self.source_id = resolve_source_id(source_id, file_config, path)
        self.gateway_url = (
            gateway_url or os.environ.get("PLEXUS_GATEWAY_URL")
            or file_config.get("gateway_url") or DEFAULT_GATEWAY_URL
        )
        self.ws_url = (ws_url or os.environ.get("PLEXUS_GATEWAY_WS_URL")
                       or file_config.get("gateway_ws_url") or None)
        self._verify_tls = verify_tls
        self._commands: CommandCenter | None = None
        self._link: Any = None
        self._serving = threading.Event()
        self.close_timeout = close_timeout
        self._close_done = threading.Event()
        self._closer: threading.Thread | None = None
        self._closed = False
        self._pollers: list[CallableAdapter] = []
        self._close_lock = threading.Lock()

        if when_full not in WHEN_FULL:
            raise ConfigError(f"when_full must be one of {', '.join(WHEN_FULL)}, got {when_full!r}")
        buffer: Buffer
        if persistent_buffer:
            from plexus.sqlite_buffer import (
                DEFAULT_SQLITE_MAX_BYTES,
                DEFAULT_SQLITE_MAX_POINTS,
                SqliteBuffer,
            )

            path_ = Path(buffer_path) if buffer_path else (
                Path.home() / ".plexus" / "buffer" / f"{self.source_id}.db"
            )
            buffer = SqliteBuffer(path_, max_buffer_points or DEFAULT_SQLITE_MAX_POINTS,
                                  sync_interval=sync_interval,
                                  max_bytes=max_buffer_bytes or DEFAULT_SQLITE_MAX_BYTES,
                                  when_full=when_full)  # type: ignore[arg-type]
        else:
            buffer = MemoryBuffer(max_buffer_points or DEFAULT_MAX_POINTS,
                                  when_full)  # type: ignore[arg-type]

        try:
            self._pipeline = Pipeline(self.source_id, tags, clock=clock)
            self._sink = HttpSink(
                HttpSinkOptions(timeout=timeout, verify_tls=verify_tls),
                name="plexus",
                api_key=self._api_key,
                gateway_url=self.gateway_url,
                transport=transport,
            )
            lane = self._pipeline.add_lane(
                self._sink, buffer, batch_size=batch_size, interval=flush_interval,
                retry=retry, sleep=sleep, on_auth_change=self._on_auth_change,
            )
        except BaseException:
            buffer.close()
            raise
        self._uploader = lane.uploader
        self._buffer = buffer
        if self._api_key is None:
            self._pipeline.set_alarm(self._raise_auth_error)
        # send() is the pipeline's emit itself: one Python frame less on the
        # hot path (about 0.1 us a call). The method below documents it.
        self.send = self._pipeline.emit  # type: ignore[method-assign]
        self._pipeline.start()
        self._agent: Any = None
        if agent_metrics:
            self._start_agent(60.0 if agent_metrics is True else float(agent_metrics))
        if persistent_buffer and len(buffer):
            log.info("%d points from an earlier run wait in %s", len(buffer), buffer_path or
                     getattr(buffer, "path", ""))
        _live_clients.add(self)

    def __repr__(self) -> str:
        return (f"Plexus(source_id={self.source_id!r}, gateway_url={self.gateway_url!r}, "
                f"api_key={self._api_key!r}, buffered={self.buffer_size()})")

    # Sending -------------------------------------------------------------
    def send(
        self,
        metric: str,
        value: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Buffer one reading for upload; never waits on the network.

        Parameters:
            metric: the name, 1..256 characters.
            value: a finite number, str (≤ 256 bytes), bool, or dict/list (≤ 4 KB of JSON).
            timestamp: Unix seconds; default now.
            tags: str → str, at most 16 with the client's and session's tags.

        Returns:
            True once the point is buffered.

        Raises:
            ValidationError (a ValueError) / PointTypeError (a TypeError):
                the platform would reject this point; nothing was buffered.
            AuthenticationError: no API key, or the platform refused it; the
                point is buffered and will be sent once a key is accepted.
            ClientClosedError: after :meth:`close`.
        """
        # A missing or refused key raises from the pipeline's alarm, after buffering.
        return self._pipeline.emit(metric, value, timestamp, tags)

    def send_batch(
        self,
        points: Sequence[tuple[str, Any] | tuple[str, Any, float | None]],
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Buffer several readings: ``(metric, value)``, or ``(metric, value,
        timestamp)`` for a reading with its own time (Unix seconds).

        Readings without their own timestamp share ``timestamp`` (default: now,
        the same for all); all share ``tags``. They are validated first and
        buffered together (all or none), so they go out in one request unless
        the protocol's limits force a split. Raises as :meth:`send`; a
        ValidationError names the bad entry as ``points[i]``.
        """
        self._pipeline.emit_many(points, timestamp, tags)
        return True

    def event(
        self,
        name: str,
        data: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Record something that happened (a fault, a state change, a log line).

        An event is a point the platform stores as an event rather than a
        metric: ``data`` is text (at most 256 bytes of UTF-8), a bool, or a
        dict/list (at most 4,096 bytes of JSON). It is buffered and delivered
        like any reading, in the same batches.

        Parameters:
            name: the event's name, 1..256 characters (``"fault"``, ``"log"``).
            data: what happened, as above.
            timestamp: Unix seconds; default now.
            tags: as for :meth:`send`.

        Returns:
            True once the event is buffered.

        Raises:
            PointTypeError (a TypeError): ``data`` is a number (the platform
                would store it as a metric: use :meth:`send`, or wrap it as
                ``{"value": n}``) or of a type an event cannot carry.
            ValidationError, AuthenticationError, ClientClosedError: as :meth:`send`.
        """
        check_metric(name)
        value = normalize_value(name, data)
        if type(value) is int or type(value) is float:
            raise PointTypeError(
                f"event {name!r}: data must be text, a bool, or a dict/list, got a number "
                f"({value!r}); a number is a reading: px.send({name!r}, {value!r}), or "
                f"wrap it: {{'value': {value!r}}}"
            )
        return self._pipeline.emit(name, value, timestamp, tags)

    def batch(self, interval_ms: float = 100.0, max_points: int = 5000,
              max_pending: int = 200_000) -> BatchSender:
        """The official SDK's sender for fast streams: ``with px.batch() as b: b.send(...)``.

        Here ``b.send``/``b.send_batch`` are :meth:`send`/:meth:`send_batch`
        themselves (every send is buffered and uploaded in batches already);
        the arguments are checked as the SDK checks them and otherwise map
        onto this client's settings (see :class:`~plexus.batching.BatchSender`
        and docs/migrating.md). ``b.dropped`` counts the points the buffer
        dropped while the block was open.

        Raises:
            ConfigError: (a ValueError) ``interval_ms`` below 2, ``max_points``
                below 1 or ``max_pending`` below ``max_points``.
        """
        return BatchSender(self, interval_ms, max_points, max_pending)

    def _on_auth_change(self, error: AuthenticationError | None) -> None:
        refused = error is not None or self._api_key is None
        self._pipeline.set_alarm(self._raise_auth_error if refused else None)

    def _raise_auth_error(self) -> None:
        if self._api_key is None:
            raise AuthenticationError(
                "no API key: pass Plexus(api_key=...), set PLEXUS_API_KEY, or put "
                '{"api_key": ...} in ~/.plexus/config.json; the data stays buffered'
            )
        raise AuthenticationError(f"{self._uploader.auth_error}; the data stays buffered")

    def session(self, session_id: str, tags: dict[str, str] | None = None) -> Any:
        """Tag everything sent inside ``with px.session(...)`` (from any thread).

        Points carry ``session_id=<id>`` plus ``tags``. Nested sessions: the
        inner id replaces the outer one while it is open, tags merge (inner
        wins), and leaving it restores the outer session.
        """
        return self._pipeline.session(session_id, tags)

    def poll(
        self,
        func: Callable[..., Any],
        interval: float = 1.0,
        metric: str | None = None,
        tags: dict[str, str] | None = None,
        name: str | None = None,
    ) -> CallableAdapter:
        """Call ``func`` every ``interval`` seconds in a background thread and send its result.

        ``func`` may return a number/str/bool (sent as ``metric``), a dict
        ``{metric: value}``, a list of ``(metric, value)`` tuples, or None; a
        generator function is drained instead, sending each item as it comes.
        Exceptions are counted in the returned adapter's ``health()`` and
        logged; polling goes on until :meth:`close` or ``adapter.stop()``.
        """
        adapter = CallableAdapter(
            CallableOptions(function=getattr(func, "__qualname__", "function"),
                            interval=interval, metric=metric),
            name=name or getattr(func, "__name__", "callable"),
            func=func,
        )
        adapter.start(SourceContext(self._pipeline, tags))
        self._pollers.append(adapter)
        return adapter

    # Remote commands -----------------------------------------------------
    def command(
        self,
        name: str,
        *,
        title: str | None = None,
        description: str | None = None,
        danger: str = "normal",
        idempotent: bool = False,
        expires_in: float = 30.0,
        concurrency: str = "accept",
        params: dict[str, dict[str, Any]] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare a command the dashboard can run; use as a decorator.

        The handler is called as ``handler(run, **params)`` on its own thread
        with the parameters checked and converted; its return value becomes
        the result (None gives ``{}``, a non-dict ``v`` gives ``{"value": v}``)
        and an exception a failure (raise :class:`plexus.Cancelled` to stop
        early). ``run`` offers ``progress(percent, message)``,
        ``time_remaining`` and ``cancel_requested``. The first declaration
        opens the device link in the background. See docs/commands.md.

        Raises:
            CommandDeclarationError: (a ValueError) the declaration breaks a
                rule; ConfigError: the source id cannot be used on the link.
        """

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            cmd = declare(name, handler, title=title, description=description, danger=danger,
                          idempotent=idempotent, expires_in=expires_in,
                          concurrency=concurrency, params=params)
            self._command_center().add(cmd)
            self._open_link()
            return handler

        return register

    def on_command(self, name: str, handler: Callable[[str, dict[str, Any]], Any],
                   concurrency: str = "accept", *, description: str | None = None,
                   params: Any = None) -> None:
        """Answer legacy ``typed_command`` frames named ``name`` with
        ``handler(command, params)`` (the open-source gateway's commands).

        ``description`` and ``params`` are accepted for code written for the
        official SDK and have no effect: legacy handlers are not announced to
        the platform (as in the SDK since 0.16), so there is nothing to
        describe, and the handler checks its own parameters."""
        self._command_center().add_legacy(name, handler, concurrency)
        self._open_link()

    def serve(self, timeout: float | None = None) -> None:
        """Answer commands until SIGINT or SIGTERM (or :meth:`close` from another
        thread, or ``timeout`` seconds), then close the client, delivering what
        is buffered. Sending from other threads goes on meanwhile."""
        if self._commands is None or not self._commands.wants_link:
            log.warning("serve(): no command is declared, so there is nothing to answer")
        previous: dict[Any, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, _frame: Any) -> None:
                log.info("received %s: closing", signal.Signals(signum).name)
                self._serving.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self._serving.wait(timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def stop_serving(self) -> None:
        """Make :meth:`serve` return (it then closes the client); safe from any thread."""
        self._serving.set()

    @property
    def clock(self) -> Clock:
        """Stamps points sent without a timestamp; ``clock.status()`` says whether the
        system clock is trusted, and how many points wait for a trustworthy time."""
        return self._pipeline.clock

    @property
    def clock_offset(self) -> float | None:
        """Seconds to add to this computer's clock to match the platform's, as
        measured when the device link last authenticated; None before that.
        The client's clock uses the same measurement as a time reference
        (see :attr:`clock` and docs/time.md)."""
        return None if self._link is None else self._link.clock_offset

    @property
    def link_state(self) -> str:
        """The device link: ``off`` (no command declared), ``connecting``, ``up``,
        ``waiting`` (to reconnect) or ``stopped``."""
        return "off" if self._link is None else self._link.state

    def _start_agent(self, interval: float) -> None:
        from plexus.service.agent import AgentReporter
        from plexus.service.figures import Figures

        figures = Figures(self.source_id, adapters=lambda: list(self._pollers),
                          lanes=lambda: list(self._pipeline.lanes),
                          link=lambda: self._link, commands=lambda: self._commands)
        self._agent = AgentReporter(self._pipeline, figures, interval=interval)
        self._agent.start()

    def _command_center(self) -> CommandCenter:
        if self._commands is None:
            self._commands = CommandCenter()
        return self._commands

    def _open_link(self) -> None:
        if self._closed:
            raise ClientClosedError("this client is closed; create a new Plexus() to serve "
                                    "commands")
        if self._link is not None:
            self._link.reannounce()
            return
        from plexus import __version__
        from plexus.link import DEFAULT_WS_URL, DeviceLink

        assert self._commands is not None
        self._link = DeviceLink(self.ws_url or DEFAULT_WS_URL, self._api_key, self.source_id,
                                self._commands, agent_version=__version__,
                                platform="python-sdk", verify_tls=self._verify_tls,
                                clock=self._pipeline.clock)
        self._link.start()

    # The official SDK's hosted-only features --------------------------------
    def run(self, name: str, **kwargs: Any) -> Any:
        """Not offered (the SDK's test runs need the platform's runs API).

        Raises:
            UnsupportedError: always; tag a run's points with :meth:`session`.
        """
        raise unsupported("px.run()", f"to tag the points of a run, use "
                          f"px.session({name!r})")

    def start_run(self, name: str, **kwargs: Any) -> Any:
        """Not offered; raises UnsupportedError (see :meth:`run`)."""
        raise unsupported("px.start_run()", "to tag the points of a run, use "
                          "px.session(name) (or pipeline begin/end from the gateway)")

    def end_run(self, *args: Any, **kwargs: Any) -> Any:
        """Not offered; raises UnsupportedError (see :meth:`run`)."""
        raise unsupported("px.end_run()", "runs are not offered; see px.session()")

    def send_video_frame(self, frame: Any, camera_id: str = "default", **kwargs: Any) -> Any:
        """Not offered (video goes over the platform's device WebSocket as frames).

        Raises:
            UnsupportedError: always.
        """
        raise unsupported("px.send_video_frame()", "video is not offered; send readings "
                          "about the camera (frame counts, exposure) with px.send()")

    def send_thermal_frame(self, *args: Any, **kwargs: Any) -> Any:
        """Not offered; raises UnsupportedError (see :meth:`send_video_frame`)."""
        raise unsupported("px.send_thermal_frame()", "thermal video is not offered; send "
                          "temperatures as readings with px.send()")

    def stream_camera(self, url: str, camera_id: str = "default", **kwargs: Any) -> Any:
        """Not offered; raises UnsupportedError (see :meth:`send_video_frame`)."""
        raise unsupported("px.stream_camera()", "video is not offered")

    # Buffer --------------------------------------------------------------
    def buffer_size(self) -> int:
        """Points not yet acknowledged by the platform (in-flight batches included)."""
        return len(self._pipeline)

    @property
    def dropped(self) -> int:
        """Points dropped because the buffer was full (oldest first)."""
        return self._pipeline.dropped

    @property
    def dropped_points(self) -> int:
        """The official SDK's count of points the platform did not store: here,
        the points it refused as invalid (``stats.rejected``; each logged).

        Points turned away at the platform's per-source rate ceiling are sent
        again until stored, so they never count; points dropped from a full
        buffer during an outage are :attr:`dropped`. Lost in all:
        ``px.dropped + px.dropped_points``."""
        return self._uploader.stats.rejected

    @property
    def rate_limited_frames(self) -> int:
        """The official SDK's count of WebSocket telemetry frames the platform
        dropped at its rate limit: always 0 here. Telemetry goes over HTTP,
        where a request the rate ceiling turns away is sent again until stored
        (so :class:`~plexus.RateLimitedError` is never raised either)."""
        return 0

    @property
    def stats(self) -> Any:
        """Delivery counters: delivered, rejected, failures, last_error..."""
        return self._uploader.stats

    def flush_buffer(self, timeout: float | None = None) -> bool:
        """Send everything buffered now and wait until it is delivered.

        Returns:
            True when the buffer is empty.

        Raises:
            AuthenticationError: no key, or the platform refused it.
            DeliveryError (a PlexusError): delivery failed after retries, or
                ``timeout`` passed. The data stays buffered in every case.
        """
        if self._closed:
            return len(self._pipeline) == 0
        return self._pipeline.flush(timeout)

    # Lifecycle -----------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Stop accepting points and deliver what is buffered for up to ``timeout``
        seconds (default ``close_timeout``). What is left stays on disk with the
        persistent buffer. Idempotent."""
        with self._close_lock:
            if self._closed:
                closing_elsewhere = True
            else:
                closing_elsewhere = False
                self._closed = True
        if closing_elsewhere:
            # serve() returning while another thread's close() still runs would let
            # a script end before its buffered points are delivered.
            if threading.current_thread() is not self._closer:
                self._close_done.wait(self.close_timeout + 10.0)
            return
        self._closer = threading.current_thread()
        self._serving.set()
        if self._link is not None:
            self._link.stop()
        if self._commands is not None:
            self._commands.close()
        for poller in self._pollers:
            poller.stop()
        if self._agent is not None:
            self._agent.stop(final_report=True)  # the last figures go with the last points
        try:
            self._pipeline.close(self.close_timeout if timeout is None else timeout)
        finally:
            _live_clients.discard(self)
            self._close_done.set()

    def __enter__(self) -> Plexus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@atexit.register
def _close_live_clients() -> None:
    # A script that forgets close() still gets its buffered points delivered.
    for client in list(_live_clients):
        try:
            client.close()
        except Exception as exc:  # never raise at interpreter exit
            log.warning("closing %r at exit failed: %s", client, exc)
