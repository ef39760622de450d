"""The uploader: moves batches from one buffer to one sink, with retry.

One uploader thread per sink. It takes a batch when ``batch_size`` points
wait or ``interval`` seconds have passed (or a flush is asked for), hands it
to the sink, and acknowledges it in the buffer once the sink says it is done.

Failures, as docs/protocol.md asks:

- retryable (5xx, timeouts, resets): ``retries`` more attempts with
  exponential backoff and jitter (1 s, 2 s, 4 s, each +-25%, capped at
  ``max_delay``). When they are exhausted the batch stays in flight (same
  points, same idempotency key) and the next cycle, ``max_delay`` later or on
  a flush, tries again. Nothing is dropped.
- the platform's rate ceiling (``retry_after`` set by the sink): a short
  jittered pause, then the same batch again.
- authentication: no retry storm; the batch is kept and tried again every
  ``auth_retry_interval`` seconds or on a flush (a 401 can be transient).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from plexus.adapters.base import RateLimitedLog
from plexus.buffer import Batch, Buffer
from plexus.errors import (
    AuthenticationError,
    DeliveryError,
    PlexusError,
    RetryableSinkError,
)
from plexus.sinks.base import Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * 2**n``, +-``jitter``, capped at ``max_delay``.

    Parameters:
        retries: attempts after the first one (3 → 4 attempts in all).
        base: the first delay in seconds.
        max_delay: no delay is longer than this.
        jitter: the fraction each delay is randomly moved by (0.25 → +-25%).
    """

    retries: int = 3
    base: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.25

    def delay(self, retry: int) -> float:
        """The pause before retry number ``retry`` (0 for the first retry)."""
        nominal = self.base * (2**retry)
        return min(self.max_delay, nominal * random.uniform(1 - self.jitter, 1 + self.jitter))


@dataclass
class UploaderStats:
    delivered: int = 0
    rejected: int = 0
    requests_ok: int = 0
    failures: int = 0
    last_error: str | None = None
    last_success: float | None = None
    last_rejection: str | None = None


class Uploader:
    """Deliver one buffer's points to one sink from a background thread.

    Parameters:
        buffer: where the points wait.
        sink: where they go.
        batch_size: this many waiting points start an upload at once.
        interval: otherwise, upload whatever waits this often (seconds).
        max_batch: at most this many points per ``sink.send`` (the protocol allows 10,000).
        retry: the backoff policy for retryable failures.
        auth_retry_interval: seconds between attempts while the key is refused;
            default: ``retry.max_delay`` (30 s).
        min_request_interval: at least this long between two requests, which keeps
            far below the platform's per-source ceiling of one request per 0.5 ms.
        sleep: waits between retries; injectable so tests need not wait for real.
            Defaults to a wait that ``stop`` interrupts.
        on_auth_change: called with the AuthenticationError when the key starts
            being refused, and with None once it is accepted again.
    """

    def __init__(
        self,
        buffer: Buffer,
        sink: Sink,
        *,
        batch_size: int = 1000,
        interval: float = 1.0,
        max_batch: int = 10_000,
        retry: RetryPolicy | None = None,
        auth_retry_interval: float | None = None,
        min_request_interval: float = 0.002,
        sleep: Callable[[float], object] | None = None,
        on_auth_change: Callable[[AuthenticationError | None], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.batch_size = batch_size
        self.interval = interval
        self.max_batch = max_batch
        self.retry = retry or RetryPolicy()
        self.auth_retry_interval = (
            self.retry.max_delay if auth_retry_interval is None else auth_retry_interval
        )
        self.min_request_interval = min_request_interval
        self.stats = UploaderStats()
        self.auth_error: AuthenticationError | None = None
        self._on_auth_change = on_auth_change

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = threading.Condition()
        self._failures_seen = 0  # bumped each time a delivery cycle gives up
        self._last_failure: PlexusError | None = None
        self._flush_requests = 0  # flush() calls waiting right now
        self._flush_calls = 0  # flush() calls ever made
        self._flushes_at_failure = 0
        self._deadline: float | None = None  # when stopping: give up after this
        self._held: Batch | None = None  # a batch whose delivery failed, kept for the next cycle
        self._sleep = sleep or self._interruptible_sleep
        self._last_request = 0.0
        self._newest_turn = False
        self._crash_log = RateLimitedLog(log, interval=30.0)
        self._thread = threading.Thread(target=self._run, name=f"plexus-uploader:{sink.name}",
                                        daemon=True)
        buffer.set_ready_callback(self._wake.set, batch_size)

    # Control -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; block until the buffer is empty.

        Returns True when empty. Raises AuthenticationError if the key is
        missing or refused, DeliveryError if delivery failed after retries or
        ``timeout`` passed; the data stays buffered either way.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            failures_before = self._failures_seen
            self._flush_requests += 1
            self._flush_calls += 1
            self._wake.set()
            try:
                while len(self.buffer) > 0:
                    if self._failures_seen != failures_before:
                        error = self._last_failure
                        if isinstance(error, AuthenticationError):
                            raise AuthenticationError(str(error))
                        raise DeliveryError(
                            f"delivery to {self.sink.name} failed ({error}); "
                            f"{len(self.buffer)} points stay buffered for retry"
                        )
                    if not self._thread.is_alive():
                        raise DeliveryError(f"uploader for {self.sink.name} is not running")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise DeliveryError(
                            f"flush timed out; {len(self.buffer)} points stay buffered"
                        )
                    self._state.wait(0.05 if remaining is None else min(remaining, 0.05))
            finally:
                self._flush_requests -= 1
        return True

    def stop(self, timeout: float) -> None:
        """Deliver what the buffer holds for up to ``timeout`` seconds, then stop."""
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 5.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # The thread ----------------------------------------------------------
    def _interruptible_sleep(self, seconds: float) -> None:
        if self._stop.is_set():
            # Shutting down: keep retrying, but never past the grace deadline.
            remaining = (self._deadline or 0.0) - time.monotonic()
            time.sleep(max(0.0, min(seconds, remaining)))
        else:
            self._stop.wait(seconds)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _run(self) -> None:
        try:
            while True:
                if self._stop.is_set() and (len(self.buffer) == 0 or self._past_deadline()):
                    break
                try:
                    if not self._cycle():
                        break
                except Exception as exc:
                    # A bug or a broken buffer must neither kill this thread (the
                    # points would wait forever) nor spin it: log, pause, go on.
                    self._crash_log(logging.ERROR, "uploader for %s hit an unexpected error "
                                    "and goes on after a pause: %s", self.sink.name,
                                    f"{type(exc).__name__}: {exc}")
                    log.debug("uploader error", exc_info=True)
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    if self._stop.is_set():
                        break
                    self._stop.wait(1.0)
        finally:
            if self._held is not None:
                self.buffer.release(self._held)
                self._held = None
            with self._state:
                self._state.notify_all()

    def _cycle(self) -> bool:
        """Take (or keep) one batch and try to deliver it; False when the thread should end."""
        batch = self._held or self._next_batch()
        if batch is None:
            return True
        self._held = None
        if self._deliver(batch):
            self._ack(batch)
            return True
        self._held = batch
        if self._stop.is_set():
            return False  # retries were already spent within the grace period
        self._wait_after_failure()
        return True

    def _ack(self, batch: Batch) -> None:
        try:
            self.buffer.ack(batch)
        except Exception:  # the uploader must outlive a buffer that fails (disk full...)
            log.exception("acknowledging a delivered batch in the %s buffer failed; its "
                          "points may be sent again (with the same Idempotency-Key)",
                          self.sink.name)

    def _next_batch(self) -> Batch | None:
        urgent = self._stop.is_set() or self._flush_requests > 0
        if not urgent and len(self.buffer) < self.batch_size:
            self._wake.wait(self.interval)
            self._wake.clear()
        # Backlog policy: while more than two full batches wait (after an
        # outage), every other batch comes from the newest end, so live data
        # reaches the platform within about one round trip instead of waiting
        # behind the whole backlog; the rest drains oldest first.
        newest = self._newest_turn and len(self.buffer) > 2 * self.max_batch
        self._newest_turn = not self._newest_turn
        batch = self.buffer.take(self.max_batch, newest=newest)
        if batch is None:
            with self._state:
                self._state.notify_all()
            if self._stop.is_set() or self._flush_requests > 0:
                self._wake.wait(0.01)  # nothing left: let flush()/stop() notice
        return batch

    def _wait_after_failure(self) -> None:
        if self._stop.is_set():
            return
        pause = (
            self.auth_retry_interval
            if isinstance(self._last_failure, AuthenticationError)
            else self.retry.max_delay
        )
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._flush_calls != self._flushes_at_failure:  # a later flush(): try now
                return
            self._wake.wait(min(0.1, deadline - time.monotonic()))
            self._wake.clear()

    def _pace(self) -> None:
        gap = self._last_request + self.min_request_interval - time.monotonic()
        if gap > 0:
            time.sleep(gap)
        self._last_request = time.monotonic()

    def _deliver(self, batch: Batch) -> bool:
        """Try one batch with retries; True when done with it (delivered or rejected)."""
        retry = 0
        rate_limited = 0
        while True:
            self._pace()
            try:
                result = self.sink.send(batch.points, batch.key)
            except AuthenticationError as exc:
                self._set_auth_error(exc)
                return self._give_up(exc)
            except RetryableSinkError as exc:
                error: PlexusError = exc
                if exc.retry_after is not None and rate_limited < 100:
                    rate_limited += 1
                    self._sleep(exc.retry_after)
                    if self._stop.is_set() and self._past_deadline():
                        return self._give_up(exc)
                    continue
            except Exception as exc:  # any other failure of a sink is treated as temporary
                error = PlexusError(f"{type(exc).__name__}: {exc}")
                log.debug("sink %s raised", self.sink.name, exc_info=True)
            else:
                self._record_success(batch, result.delivered, result.rejected)
                return True
            self.stats.failures += 1
            self.stats.last_error = str(error)
            if retry >= self.retry.retries or (self._stop.is_set() and self._past_deadline()):
                return self._give_up(error)
            delay = self.retry.delay(retry)
            log.info("sending to %s failed (%s); retry %d/%d in %.1f s", self.sink.name,
                     error, retry + 1, self.retry.retries, delay)
            self._sleep(delay)
            retry += 1

    def _set_auth_error(self, error: AuthenticationError | None) -> None:
        changed = (error is None) != (self.auth_error is None)
        self.auth_error = error
        if changed and self._on_auth_change is not None:
            self._on_auth_change(error)

    def _record_success(self, batch: Batch, delivered: int, rejected: list[tuple[int, str]]) -> None:
        self._set_auth_error(None)
        stats = self.stats
        stats.delivered += delivered
        stats.requests_ok += 1
        stats.last_success = time.time()
        stats.last_error = None
        if rejected:
            stats.rejected += len(rejected)
            for index, reason in rejected:
                metric = batch.points[index][0] if index < len(batch.points) else "?"
                stats.last_rejection = f"{metric}: {reason}"
                log.warning("%s rejected point %r and it was dropped: %s",
                            self.sink.name, metric, reason)

    def _give_up(self, error: PlexusError) -> bool:
        self.stats.last_error = str(error)
        log.warning("delivery to %s failed, keeping %d points buffered: %s",
                    self.sink.name, len(self.buffer), error)
        with self._state:
            self._last_failure = error
            self._failures_seen += 1
            self._flushes_at_failure = self._flush_calls
            self._state.notify_all()
        return False
