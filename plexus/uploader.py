"""The uploader: moves batches from one buffer to one sink, with retry.

One uploader thread per sink. It takes a batch when ``batch_size`` points
wait or ``interval`` seconds have passed (or a flush is asked for), hands it
to the sink, and acknowledges it in the buffer once the sink says it is done.

Failures, as the ingest protocol asks (docs/protocol.md):

- retryable (5xx, timeouts, resets): a delivery cycle tries the batch, then
  retries ``retries`` times after 1 s, 2 s, 4 s (``base * 2**n``, each
  +-25%, capped at ``max_delay``). Between attempts the batch goes back to
  the buffer, so during an outage it can be dropped like any waiting point
  (drop-oldest means the oldest), and while its points are intact it keeps
  its idempotency key. When a cycle gives up, ``flush()`` raises; the next
  cycle starts at the next ``put`` (the next reading) or after one jittered
  ``interval`` for a quiet source, or on a flush. No pause is a fixed value,
  so a fleet that failed at the same moment does not come back in step.
- the platform's rate ceiling (``retry_after`` set by the sink): a short
  jittered pause, then the same batch again; not a failure.
- authentication: no retry storm; the batch is kept and tried again every
  ``auth_retry_interval`` seconds (+-25%) or on a flush (a 401 can be transient).

While the last attempt succeeded the uploader tells its buffer the sink is
healthy, so a full buffer makes producers wait instead of dropping; the
first failure ends that (see :mod:`plexus.buffer`).

Upload rules (:mod:`plexus.upload_rules`) add three things, all optional:

- ``budget``: before each request the uploader waits until the sink's
  :class:`~plexus.upload_rules.ByteBudget` allows it, and charges what the
  sink reports sending afterwards (``Sink.record_sent``; an estimate for a
  sink that never reports). Batches are cut to about one burst of bytes.
- ``gate``: while it answers False (a hold), nothing is taken from the
  buffer, the buffer is told the lane is not delivering (a full held buffer
  drops its oldest instead of stalling the producers), ``flush()`` does not
  wait for the held points, and ``stop()`` leaves them in the buffer.
- ``send_lock``: the two uploaders of a sink with a held lane take turns on
  the sink, which is called from one thread at a time, as before.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from plexus.adapters.base import RateLimitedLog
from plexus.buffer import Batch, Buffer
from plexus.errors import (
    AuthenticationError,
    DeliveryError,
    PlexusError,
    RetryableSinkError,
)
from plexus.sinks.base import SendResult, Sink

if TYPE_CHECKING:
    from plexus.upload_rules import ByteBudget

log = logging.getLogger(__name__)

#: Every pause is moved by up to this fraction, so devices that failed together
#: spread out when the platform returns.
JITTER = 0.25
# The rate ceiling's "send again soon" may repeat; beyond this many in a row the
# batch is treated as failed, so a permanently throttled source still backs off.
_MAX_RATE_LIMITED = 100
_NEVER = 1 << 62  # a ready threshold no buffer reaches
_GUESS_BYTES_PER_POINT = 8.0  # a gzipped numeric point; corrected after the first request


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """``seconds`` +-``JITTER``."""
    return seconds * (rng or random).uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * 2**n``, +-``jitter``, capped at ``max_delay``.

    Parameters:
        retries: attempts after the first one (3 → 4 attempts in a cycle).
        base: the first delay in seconds.
        max_delay: no delay is longer than this.
        jitter: the fraction each delay is randomly moved by (0.25 → +-25%).
    """

    retries: int = 3
    base: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.25

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The pause before retry number ``retry`` (0 for the first retry)."""
        nominal = self.base * (2**retry)
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.max_delay, nominal * spread)


@dataclass
class UploaderStats:
    delivered: int = 0
    rejected: int = 0
    requests_ok: int = 0
    failures: int = 0  # failed attempts (each retry counts)
    retries: int = 0  # attempts that repeated a failed one
    cycles_given_up: int = 0
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
            default: ``retry.max_delay`` (30 s); jittered.
        min_request_interval: at least this long between two requests, which keeps
            far below the platform's per-source ceiling of one request per 0.5 ms.
        sleep: waits between retries; injectable so tests need not wait for real.
            Defaults to a wait that ``stop`` interrupts.
        rng: the source of jitter; injectable so a test can assert the schedule.
        on_auth_change: called with the AuthenticationError when the key starts
            being refused, and with None once it is accepted again.
        budget: the sink's byte budget (shared with the sink's other uploader).
        gate: answers False while this lane's points are held (see the module).
        send_lock: taken around each request when two uploaders share the sink.
        label: this lane in logs and the thread's name; default: the sink's name.
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
        rng: random.Random | None = None,
        on_auth_change: Callable[[AuthenticationError | None], None] | None = None,
        budget: ByteBudget | None = None,
        gate: Callable[[], bool] | None = None,
        send_lock: threading.Lock | None = None,
        label: str | None = None,
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
        #: monotonic time the request now on the wire was started; None between
        #: requests (the service's health check finds a wedged sink with it)
        self.sending_since: float | None = None
        #: the gateway's own health points (plexus.service.agent): sent between
        #: batches while the sink delivers, never counted in ``stats``
        self.side: Buffer | None = None
        self.side_delivered = 0
        self._on_auth_change = on_auth_change
        self._rng = rng or random.Random()
        self.label = label or sink.name
        self._budget = budget
        self._gate = gate
        self._send_lock: Any = send_lock or contextlib.nullcontext()
        self._holding = False  # the gate is shut and the buffer was told
        self._bytes_per_point: float | None = None  # what the sink sent per point, lately
        self._estimate_warned = False

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = threading.Condition()
        self._failures_seen = 0  # bumped each time a delivery cycle gives up
        self._last_failure: PlexusError | None = None
        self._flush_requests = 0  # flush() calls waiting right now
        self._flush_calls = 0  # flush() calls ever made
        self._flushes_at_failure = 0
        self._deadline: float | None = None  # when stopping: give up after this
        self._retry = 0  # retries made in the current delivery cycle
        self._take_now = False  # a retry or a new cycle is due: do not wait for a batch
        self._sink_ok = True  # the last attempt succeeded (or none failed yet)
        self._attempt_error: PlexusError = PlexusError("no attempt yet")
        self._rate_limited = 0  # rate-ceiling answers in a row
        self._sleep = sleep or self._interruptible_sleep
        self._last_request = 0.0
        self._newest_turn = False
        self._crash_log = RateLimitedLog(log, interval=30.0)
        self._thread = threading.Thread(target=self._run, name=f"plexus-uploader:{self.label}",
                                        daemon=True)
        buffer.set_ready_callback(self._wake.set, batch_size)
        if budget is not None:
            # Until the sink has said what a point costs, a compact one is assumed,
            # so that the first batches (and blocks) are not many bursts big.
            buffer.set_block_limit(self._batch_limit())

    # Control -------------------------------------------------------------
    def start(self) -> None:
        self.buffer.set_consumer_running(True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the buffer now (a hold cleared, for instance)."""
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; block until the buffer is empty.

        Returns True when empty, False at once while the lane is held (held
        points wait for the hold to clear, on purpose). Raises AuthenticationError if the key is
        missing or refused, DeliveryError if a delivery cycle failed after
        its retries or ``timeout`` passed; the data stays buffered either way.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            failures_before = self._failures_seen
            self._flush_requests += 1
            self._flush_calls += 1
            self._wake.set()
            try:
                while len(self.buffer) > 0:
                    if self._gated():
                        return False
                    if self._failures_seen != failures_before:
                        error = self._last_failure
                        if isinstance(error, AuthenticationError):
                            raise AuthenticationError(str(error))
                        raise DeliveryError(
                            f"delivery to {self.label} failed ({error}); "
                            f"{len(self.buffer)} points stay buffered for retry"
                        )
                    if not self._thread.is_alive():
                        raise DeliveryError(f"uploader for {self.label} is not running")
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
        self.buffer.set_consumer_running(False)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stopped uploader's thread; True once ended."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """True while the last attempt succeeded (or none has failed yet)."""
        return self._sink_ok

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
                if self._stop.is_set() and (len(self.buffer) == 0 or self._past_deadline()
                                            or self._gated()):
                    if self._sink_ok and not (self._past_deadline() or self._gated()):
                        with self._send_lock:
                            self._send_side()  # the last health report, when there is time
                    break  # held points stay in the buffer until the hold clears
                try:
                    if not self._cycle():
                        break
                except Exception as exc:
                    # A bug or a broken buffer must neither kill this thread (the
                    # points would wait forever) nor spin it: log, pause, go on.
                    self._crash_log(logging.ERROR, "uploader for %s hit an unexpected error "
                                    "and goes on after a pause: %s", self.label,
                                    f"{type(exc).__name__}: {exc}")
                    log.debug("uploader error", exc_info=True)
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    if self._stop.is_set():
                        break
                    self._stop.wait(1.0)
        finally:
            self.buffer.set_consumer_running(False)
            with self._state:
                self._state.notify_all()

    def _gated(self) -> bool:
        return self._gate is not None and not self._gate()

    def _cycle(self) -> bool:
        """One attempt at one batch, and the wait that follows a failure.

        Returns False when the thread should end.
        """
        if self._gated():
            self._wait_while_held()
            return True
        if self._holding:
            self._holding = False
            self.buffer.set_ready_callback(self._wake.set, self.batch_size)
            self.buffer.set_healthy(self._sink_ok)
            self._take_now = True  # what was held goes now
        self._await_work()
        with self._send_lock:
            if self._gated():
                return True  # the hold began while we waited
            if self._sink_ok:
                self._send_side()
            if self._budget is not None and not self._await_budget():
                return True
            batch = self._take()
            if batch is None:
                return True
            try:
                result = self._attempt(batch)
            except BaseException:
                self.buffer.release(batch)
                raise
            if result is not None:
                self._ack(batch)
                return True
            # Back to the buffer while we wait: droppable like any waiting point, and
            # taken again first (same key) while intact.
            self.buffer.release(batch)
        error = self._attempt_error
        if isinstance(error, AuthenticationError):
            self._give_up(error)
            return self._wait_after_auth_failure()
        if self._stop.is_set() and self._past_deadline():
            self._give_up(error)
            return False
        if self._retry < self.retry.retries:
            delay = self.retry.delay(self._retry, self._rng)
            log.info("sending to %s failed (%s); retry %d/%d in %.1f s", self.label,
                     error, self._retry + 1, self.retry.retries, delay)
            self._retry += 1
            self.stats.retries += 1
            self._sleep(delay)
            self._take_now = True
            return True
        if self._stop.is_set():
            self._give_up(error)
            return False  # retries were spent within the grace period
        # Armed before flush() hears of the failure, so a reading sent right after
        # it starts the next cycle.
        self._wake.clear()
        self.buffer.wake_on_next_put()
        self._give_up(error)
        self._wait(jittered(self.interval, self._rng))
        self._take_now = True
        return True

    def _ack(self, batch: Batch) -> None:
        try:
            self.buffer.ack(batch)
        except Exception:  # the uploader must outlive a buffer that fails (disk full...)
            log.exception("acknowledging a delivered batch in the %s buffer failed; its "
                          "points may be sent again (with the same Idempotency-Key)",
                          self.label)

    def _wait_while_held(self) -> None:
        if not self._holding:
            self._holding = True
            # Producers must never wait for room in a lane that does not move: a
            # full held buffer drops its oldest (HoldGate warns well before).
            self.buffer.set_healthy(False)
            # Nothing to wake us for: keep puts on the buffer's fast path meanwhile.
            self.buffer.set_ready_callback(self._wake.set, _NEVER)
            with self._state:
                self._state.notify_all()  # a flush() waiting on this lane returns
        self._wake.wait(0.5)
        self._wake.clear()

    def _await_work(self) -> None:
        """Wait for ``batch_size`` points or ``interval`` seconds, unless something is due."""
        urgent = self._stop.is_set() or self._flush_requests > 0 or self._take_now
        self._take_now = False
        if not urgent and len(self.buffer) < self.batch_size:
            self._wake.wait(self.interval)
            self._wake.clear()

    def _batch_limit(self) -> int:
        # With a byte budget, a batch is about one burst, so that requests stay
        # small against the budget (the persistent buffer may still give a
        # whole stored block, which it never splits).
        if self._budget is not None:
            per_point = self._bytes_per_point or _GUESS_BYTES_PER_POINT
            return max(1, min(self.max_batch, int(self._budget.burst / per_point)))
        return self.max_batch

    def _await_budget(self) -> bool:
        """Wait until the byte budget allows the next request; False to skip this cycle."""
        budget = self._budget
        assert budget is not None
        per_point = self._bytes_per_point or 0.0
        expected = per_point * min(len(self.buffer), self._batch_limit())
        while True:
            delay = budget.delay(expected)
            if delay <= 0:
                return True
            if (self._stop.is_set() and self._past_deadline()) or self._gated():
                return False
            started = time.monotonic()
            self._interruptible_sleep(min(delay, 0.5))
            budget.waited += time.monotonic() - started

    def _take(self) -> Batch | None:
        # Backlog policy: while more than two full batches wait (after an
        # outage), every other batch comes from the newest end, so live data
        # reaches the platform within about one round trip instead of waiting
        # behind the whole backlog; the rest drains oldest first.
        newest = self._newest_turn and len(self.buffer) > 2 * self.max_batch
        self._newest_turn = not self._newest_turn
        batch = self.buffer.take(self._batch_limit(), newest=newest)
        if batch is None:
            self._retry = 0  # nothing left to retry (dropped, or delivered elsewhere)
            with self._state:
                self._state.notify_all()
            if self._stop.is_set() or self._flush_requests > 0:
                self._wake.wait(0.01)  # nothing left: let flush()/stop() notice
            elif len(self.buffer) >= self.batch_size:
                # Points counted but none to take (still in flight: their
                # acknowledgement failed). _await_work would not wait for them:
                # look again after an interval, not at once.
                self._wake.wait(self.interval)
                self._wake.clear()
        return batch

    def _wait_after_auth_failure(self) -> bool:
        if self._stop.is_set():
            return False
        self._wake.clear()
        self._wait(jittered(self.auth_retry_interval, self._rng), wake_on_put=False)
        self._take_now = True
        return True

    def _wait(self, seconds: float, wake_on_put: bool = True) -> None:
        """Wait ``seconds``; a flush ends it, and (``wake_on_put``) the buffer's wake-up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._flush_calls != self._flushes_at_failure:  # a later flush(): try now
                return
            if self._wake.wait(min(0.1, deadline - time.monotonic())):
                self._wake.clear()
                if wake_on_put:
                    return

    def _send_side(self) -> None:
        """Send the waiting health points, once; a failure leaves them waiting
        (the user's batches find out about the sink on their own)."""
        side = self.side
        if side is None or not len(side):
            return
        batch = side.take(self.max_batch)
        if batch is None:
            return
        self._pace()
        self.sending_since = time.monotonic()
        try:
            result = self._send(batch)  # a byte budget counts these bytes too
        except Exception as exc:
            side.release(batch)
            log.debug("sending health points to %s failed: %s", self.sink.name, exc)
            return
        finally:
            self.sending_since = None
        side.ack(batch)
        self.side_delivered += result.delivered

    def _pace(self) -> None:
        gap = self._last_request + self.min_request_interval - time.monotonic()
        if gap > 0:
            time.sleep(gap)
        self._last_request = time.monotonic()

    def _attempt(self, batch: Batch) -> SendResult | None:
        """Send one batch once (the rate ceiling's quick resends included).

        Returns the result when the batch is done with (delivered or rejected),
        None when it failed; the error is then in ``_attempt_error``.
        """
        while True:
            self._pace()
            self.sending_since = time.monotonic()
            try:
                result = self._send(batch)
            except AuthenticationError as exc:
                self._set_auth_error(exc)
                self._failed(exc)
                return None
            except RetryableSinkError as exc:
                if exc.retry_after is not None and self._rate_limited < _MAX_RATE_LIMITED:
                    self._rate_limited += 1
                    self._sleep(jittered(exc.retry_after, self._rng))
                    if not (self._stop.is_set() and self._past_deadline()):
                        continue
                self._failed(exc)
                return None
            except Exception as exc:  # any other failure of a sink is treated as temporary
                log.debug("sink %s raised", self.sink.name, exc_info=True)
                self._failed(PlexusError(f"{type(exc).__name__}: {exc}"))
                return None
            finally:
                self.sending_since = None
            self._rate_limited = 0
            self._retry = 0
            self._record_success(batch, result.delivered, result.rejected)
            if not self._sink_ok:
                self._take_now = True  # back from a failure: what waited goes out now
            self._sink_ok = True
            self.buffer.set_healthy(True)
            return result

    def _send(self, batch: Batch) -> SendResult:
        if self._budget is None:
            return self.sink.send_batch(batch)
        before = self.sink.bytes_sent
        try:
            return self.sink.send_batch(batch)
        finally:
            self._charge(batch, self.sink.bytes_sent - before)

    def _charge(self, batch: Batch, sent: int) -> None:
        """Charge the budget with what the sink sent (or an estimate if it never says)."""
        assert self._budget is not None
        if not self.sink.reports_bytes:
            sent = len(batch.body) if batch.body is not None else len(orjson.dumps(batch.points))
            if not self._estimate_warned:
                self._estimate_warned = True
                log.warning("sink %s does not report the bytes it sends (Sink.record_sent); "
                            "its max_bytes_per_s is kept on an estimate (the points' JSON, or "
                            "their stored size)", self.sink.name)
        if sent <= 0:
            return
        self._budget.charge(sent)
        if batch.count:
            per_point = sent / batch.count
            old = self._bytes_per_point
            self._bytes_per_point = per_point if old is None else 0.7 * old + 0.3 * per_point
            # Stored blocks are never split: keep them about one burst too.
            self.buffer.set_block_limit(self._batch_limit())

    def _failed(self, error: PlexusError) -> None:
        self._rate_limited = 0
        self._attempt_error = error
        self.stats.failures += 1
        self.stats.last_error = str(error)
        self._sink_ok = False
        self.buffer.set_healthy(False)

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
            self.buffer.count_rejected(len(rejected))  # stored with the ack that follows
            points = batch.points
            for index, reason in rejected:
                metric = points[index][0] if index < len(points) else "?"
                stats.last_rejection = f"{metric}: {reason}"
                log.warning("%s rejected point %r and it was dropped: %s",
                            self.sink.name, metric, reason)

    def _give_up(self, error: PlexusError) -> None:
        self._retry = 0
        self.stats.cycles_given_up += 1
        log.warning("delivery to %s failed, keeping %d points buffered: %s",
                    self.label, len(self.buffer), error)
        with self._state:
            self._last_failure = error
            self._failures_seen += 1
            self._flushes_at_failure = self._flush_calls
            self._state.notify_all()
