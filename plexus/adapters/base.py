"""The adapter (source) contract.

An adapter turns what it hears into points and hands them to the pipeline
through its context's ``emit``. The gateway builds one adapter per entry of
the rig file's ``adapters:`` list from the adapter class and its options
dataclass, calls :meth:`Adapter.start` once, and :meth:`Adapter.stop` at
shutdown. One adapter failing never stops the others: exceptions raised by
an adapter are counted in its health and logged, at a limited rate.

Most adapters subclass :class:`ThreadedAdapter`, which runs a reader loop in
its own thread and reconnects with backoff whenever the loop raises.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Protocol

from plexus.clock import WALL_CLOCK
from plexus.errors import AdapterError, PlexusError
from plexus.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class AdapterContext(Protocol):
    """What the pipeline offers an adapter."""

    def emit(
        self,
        metric: str,
        value: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Validate and buffer one point; raises ValidationError for a bad one."""

    def begin_session(self, session_id: str, tags: dict[str, str] | None = None) -> None:
        """Tag every point of the pipeline with ``session_id`` until ended."""

    def end_session(self, session_id: str) -> None:
        """End the session begun with ``session_id``."""

    # A pipeline's context also has ``clock`` (a plexus.clock.Clock): adapters
    # read it through Adapter.clock, which falls back to the system clock.


@dataclass
class AdapterHealth:
    """A snapshot of an adapter's state for status output."""

    name: str
    type: str
    state: str  # "starting" | "connected" | "reconnecting" | "link_lost" | "finished" | "stopped" | "failed"
    points: int
    errors: int
    last_point_time: float | None
    last_error: str | None
    extra: dict[str, Any]

    @property
    def connected(self) -> bool:
        return self.state == "connected"


def describe_error(exc: BaseException) -> str:
    """An exception as an operator reads it: our own errors by their message alone,
    a driver's with its type (``OSError: [Errno 19] No such device``)."""
    if isinstance(exc, PlexusError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def require(module: str, extra: str) -> ModuleType:
    """Import a driver library, or raise AdapterError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AdapterError(
            f"{module!r} is not installed: pip install 'plexus-gateway[{extra}]' ({exc})"
        ) from exc


class Backoff:
    """Exponential reconnect delays with +-25% jitter: 0.5, 1, 2, ... capped."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = min(self._next, self.maximum)
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(0.75, 1.25)


class Adapter:
    """Base class of every source.

    Subclasses set ``type_name`` (the ``type:`` used in YAML) and ``Options``
    (a dataclass whose fields are the adapter's options, each with its
    default; the config loader validates against it), and implement
    :meth:`start` and :meth:`stop`.

    Parameters:
        options: an instance of ``Options``.
        name: the adapter's name in logs and status (defaults to its type).
    """

    type_name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    #: pip extra that brings the driver library, named in errors.
    extra: ClassVar[str | None] = None
    #: driver modules the adapter imports when it starts (checked by ``--check``).
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, name: str | None = None) -> None:
        self.options = options
        self.name = name or self.type_name
        self.state = "starting"
        self.points = 0
        self.errors = 0
        self.last_point_time: float | None = None
        self.last_error: str | None = None
        self._ctx: AdapterContext | None = None
        #: The pipeline's clock once started (``now()``, ``from_wall()``, ``observe()``;
        #: see plexus.clock): an adapter that stamps a whole message or frame itself
        #: asks it, so the time is right even while the system clock is not.
        self.clock: Any = WALL_CLOCK
        self._log = logging.getLogger(f"plexus.adapters.{self.name}")
        self._bad_input_log = RateLimitedLog(self._log)

    # Lifecycle -----------------------------------------------------------
    def start(self, ctx: AdapterContext) -> None:
        """Begin producing points into ``ctx.emit``; must not block.

        Raises AdapterError when the adapter cannot start at all (a missing
        driver, a file that does not exist); a link that is merely down is
        retried in the background instead.
        """
        self._ctx = ctx
        self.clock = getattr(ctx, "clock", None) or WALL_CLOCK

    def stop(self, timeout: float = 5.0) -> None:
        """Stop producing points, within ``timeout`` seconds."""
        self.state = "stopped"

    # Checks before starting (plexus-gateway --check) --------------------
    def preflight(self) -> list[str]:
        """What would make :meth:`start` fail, found without starting (``--check``).

        Override to check files (a database, a capture, TLS certificates)
        and settings only the driver can judge. Returns one message per
        problem, without the adapter's name (the caller adds it and the line).
        """
        return []

    def preflight_online(self, timeout: float) -> list[str]:
        """``--check --online``: touch the world without producing points.

        Open the port, connect to the broker, find the interface, then let go;
        within about ``timeout`` seconds. Returns one message per problem.
        """
        return []

    # Helpers for subclasses ----------------------------------------------
    def emit(
        self,
        metric: str,
        value: Any,
        timestamp: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Hand one reading to the pipeline; a rejected point is counted, never raised."""
        assert self._ctx is not None, "emit() before start()"
        try:
            self._ctx.emit(metric, value, timestamp, tags)
        except PlexusError as exc:
            self.bad_input(f"point {metric!r} rejected: {exc}")
            return False
        self.points += 1
        self.last_point_time = time.time()
        return True

    def begin_session(self, session_id: str, tags: dict[str, str] | None = None) -> None:
        """Tag every point of the gateway with ``session_id`` (and ``tags``) until ended."""
        assert self._ctx is not None, "begin_session() before start()"
        self._ctx.begin_session(session_id, tags)

    def end_session(self, session_id: str) -> None:
        """End the session begun with ``session_id``."""
        assert self._ctx is not None, "end_session() before start()"
        self._ctx.end_session(session_id)

    def bad_input(self, reason: str) -> None:
        """Count a frame/payload/line that could not be used, and log it (rate-limited)."""
        self.errors += 1
        self.last_error = reason
        self._bad_input_log(logging.WARNING, "%s: %s", self.name, reason)

    def record_error(self, exc: BaseException) -> None:
        """Count an error of the adapter itself (link lost, driver raised)."""
        self.errors += 1
        self.last_error = describe_error(exc)
        self._bad_input_log(logging.WARNING, "%s: %s", self.name, self.last_error)

    def health_extra(self) -> dict[str, Any]:
        """Adapter-specific counters for status output (override)."""
        return {}

    def health(self) -> AdapterHealth:
        return AdapterHealth(
            name=self.name,
            type=self.type_name,
            state=self.state,
            points=self.points,
            errors=self.errors,
            last_point_time=self.last_point_time,
            last_error=self.last_error,
            extra=self.health_extra(),
        )


class ThreadedAdapter(Adapter):
    """An adapter that reads in its own thread and reconnects with backoff.

    Subclasses implement :meth:`connect` (open the link; raise if it cannot),
    :meth:`run_connected` (read until :attr:`stopping` is set; raise or return
    when the link is lost) and optionally :meth:`disconnect`.

    Reconnecting: when the link is lost (``run_connected`` raised or returned)
    or ``connect`` raised, the thread logs what went wrong and when the next
    attempt is (rate-limited), then:

    - after a connection that worked (it emitted a point, or stayed up
      ``stable_after`` seconds) it reconnects at once, but no sooner than
      ``reconnect_initial`` seconds after the last connect; the backoff starts
      over. A fast poller with a rare read error loses next to nothing.
    - otherwise (``connect`` failed, or the link died before delivering
      anything) it waits ``reconnect_initial`` seconds, doubling per failure
      in a row up to ``reconnect_max``, each +-25%.

    A read error that leaves the link usable should not end ``run_connected``
    at all: count it with :meth:`record_error` and read on.
    """

    #: first pause before reconnecting, seconds (doubled per failure in a row)
    reconnect_initial: ClassVar[float] = 0.5
    #: longest pause between attempts, seconds
    reconnect_max: ClassVar[float] = 30.0
    #: seconds a link that emitted nothing must stay up before the backoff starts over
    stable_after: ClassVar[float] = 10.0

    def __init__(self, options: Any, name: str | None = None) -> None:
        super().__init__(options, name)
        self.stopping = threading.Event()
        self.reconnects = 0
        #: time.time() of the next connection attempt while reconnecting, else None
        self.next_attempt_at: float | None = None
        self._thread: threading.Thread | None = None
        self._reconnect_log = RateLimitedLog(self._log)

    def connect(self) -> None:
        raise NotImplementedError

    def run_connected(self) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        """Close the link; must not raise and may be called when not connected."""

    def start(self, ctx: AdapterContext) -> None:
        super().start(ctx)
        # A stopped adapter can be started again (a remote start_can after stop_can).
        self.stopping.clear()
        self.state = "starting"
        self._thread = threading.Thread(
            target=self._main, name=f"plexus-adapter:{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        try:
            self.disconnect()
        except Exception as exc:  # a driver failing on close must not block shutdown
            self._log.debug("%s: disconnect failed: %s", self.name, exc)
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def _main(self) -> None:
        backoff = Backoff(self.reconnect_initial, self.reconnect_max)
        while not self.stopping.is_set():
            connected_at = None
            points_before = self.points
            reason = "the link ended"
            try:
                self.connect()
                self.state = "connected"
                self.next_attempt_at = None
                connected_at = time.monotonic()
                self.run_connected()
            except Exception as exc:
                reason = describe_error(exc)
                if connected_at is None:
                    reason = f"cannot connect: {reason}"
                if not self.stopping.is_set():
                    self.errors += 1
                    self.last_error = reason
            finally:
                try:
                    self.disconnect()
                except Exception as exc:
                    self._log.debug("%s: disconnect failed: %s", self.name, exc)
            if self.stopping.is_set():
                break
            uptime = 0.0 if connected_at is None else time.monotonic() - connected_at
            if connected_at is not None and (self.points > points_before
                                             or uptime >= self.stable_after):
                # It worked: try again at once, yet never open more often than once per
                # reconnect_initial, and start the backoff over for what follows.
                backoff.reset()
                delay = max(0.0, self.reconnect_initial - uptime)
            else:  # it opens and dies at once, or does not open: back off
                delay = backoff.next_delay()
            self.state = "reconnecting"
            self.reconnects += 1
            self.next_attempt_at = time.time() + delay
            self._reconnect_log(logging.WARNING, "%s: %s; %s", self.name, reason,
                                f"next attempt in {delay:.1f} s" if delay >= 0.05
                                else "reconnecting now")
            self.stopping.wait(delay)
        self.next_attempt_at = None
        self.state = "stopped"
