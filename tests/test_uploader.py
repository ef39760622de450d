"""The uploader on its own: batching, the retry schedule, the rate ceiling, keys.

Each test drives a real Uploader with a real memory buffer and the HTTP sink
against the local receiver; waits between retries go through an injected
``sleep`` that records them, and jitter comes from a seeded ``rng``, so the
schedule is asserted exactly.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import orjson
import pytest

from plexus.buffer import MemoryBuffer
from plexus.errors import AuthenticationError, DeliveryError, PlexusError, RetryableSinkError
from plexus.point import Point
from plexus.sinks.base import SendResult, Sink
from plexus.sinks.http import HttpSink
from plexus.upload_rules import ByteBudget
from plexus.uploader import JITTER, RetryPolicy, Uploader, jittered

KEY = "plx_test"
T0 = 1_700_000_000_000


class Sleeps:
    """An injected sleep that records each pause and returns at once."""

    def __init__(self, on_sleep=None) -> None:  # type: ignore[no-untyped-def]
        self.pauses: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.pauses))


def point(i: int, metric: str | None = None) -> Point:
    return (metric or f"m{i}", i, T0 + i, None)


@pytest.fixture
def lane(plexus_receiver):  # type: ignore[no-untyped-def]
    """make(receiver=None, **uploader options) -> (uploader, buffer, sink); stopped after."""
    made: list[tuple[Uploader, HttpSink]] = []

    def make(rx=None, *, buffer: MemoryBuffer | None = None, key: str = KEY,  # type: ignore[no-untyped-def]
             **options):
        rx = plexus_receiver if rx is None else rx
        sink = HttpSink(name="plexus", api_key=key, gateway_url=rx.url)
        sink.open("rig-01")
        buffer = MemoryBuffer(100_000) if buffer is None else buffer
        options.setdefault("rng", random.Random(11))
        options.setdefault("min_request_interval", 0.0)
        uploader = Uploader(buffer, sink, **options)
        made.append((uploader, sink))
        return uploader, buffer, sink

    yield make
    for uploader, sink in made:
        uploader.stop(1.0)
        sink.close()


def values(rx) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(p["value"] for p in rx.points)


# --- the retry policy ----------------------------------------------------------------------


def test_the_policy_doubles_from_its_base_and_is_capped():
    still = RetryPolicy(retries=5, base=1.0, max_delay=10.0, jitter=0.0)
    assert [still.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    half = RetryPolicy(base=0.5, jitter=0.0)
    assert [half.delay(n) for n in range(3)] == [0.5, 1.0, 2.0]


def test_the_policy_jitter_is_drawn_from_the_rng_it_is_given():
    policy = RetryPolicy(jitter=0.1)
    rng, same = random.Random(5), random.Random(5)
    assert [policy.delay(n, rng) for n in range(3)] == \
        [2**n * same.uniform(0.9, 1.1) for n in range(3)]


def test_the_policy_defaults_are_three_retries_from_one_second():
    policy = RetryPolicy()
    assert (policy.retries, policy.base, policy.max_delay, policy.jitter) == (3, 1.0, 30.0, 0.25)


def test_jittered_moves_a_pause_by_up_to_a_quarter():
    rng, same = random.Random(9), random.Random(9)
    assert JITTER == 0.25
    drawn = [jittered(10.0, rng) for _ in range(50)]
    assert drawn == [10.0 * same.uniform(0.75, 1.25) for _ in range(50)]
    assert 7.5 <= min(drawn) and max(drawn) <= 12.5 and len(set(drawn)) == 50


# --- a delivery cycle -----------------------------------------------------------------------


def test_a_failing_cycle_retries_on_the_exact_schedule_then_gives_up(plexus_receiver, lane):
    plexus_receiver.go_down()
    sleeps = Sleeps()
    uploader, buffer, _ = lane(interval=60.0, sleep=sleeps, rng=random.Random(3),
                               retry=RetryPolicy(retries=4, base=0.5, max_delay=3.0))
    buffer.put(point(1))
    uploader.start()
    with pytest.raises(DeliveryError, match=r"delivery to plexus failed \(.*\); 1 points stay "
                                            "buffered for retry"):
        uploader.flush(timeout=30)
    expected = random.Random(3)
    assert sleeps.pauses == [min(3.0, 0.5 * 2**n * expected.uniform(0.75, 1.25))
                             for n in range(4)]
    assert sleeps.pauses[3] == 3.0  # 4 s x jitter, capped
    stats = uploader.stats
    assert (stats.failures, stats.retries, stats.cycles_given_up, stats.delivered) == (5, 4, 1, 0)
    assert stats.last_error and "ConnectError" in stats.last_error
    assert not uploader.healthy and len(buffer) == 1


def test_a_retry_that_succeeds_ends_the_cycle_and_the_next_failure_starts_afresh(
        plexus_receiver, lane):
    sleeps = Sleeps()
    uploader, buffer, _ = lane(interval=60.0, sleep=sleeps, rng=random.Random(4))
    plexus_receiver.fail_next(2, status=503)
    buffer.put(point(1))
    uploader.start()
    uploader.flush(timeout=30)
    plexus_receiver.fail_next(1, status=503)
    buffer.put(point(2))
    uploader.flush(timeout=30)
    expected = random.Random(4)
    first = [expected.uniform(0.75, 1.25), 2 * expected.uniform(0.75, 1.25)]
    assert sleeps.pauses == [*first, expected.uniform(0.75, 1.25)]  # 1 s again, not 4 s
    assert uploader.stats.retries == 3 and uploader.stats.failures == 3
    assert uploader.stats.delivered == 2 and uploader.healthy
    assert values(plexus_receiver) == [1, 2]
    # A retried batch keeps its key: the three attempts at point 1 share one.
    keys = [r.idempotency_key for r in plexus_receiver.requests]
    assert keys[0] == keys[1] == keys[2] and keys[3] == keys[4] and keys[0] != keys[3]


def test_after_giving_up_the_next_reading_starts_a_new_cycle(plexus_receiver, lane):
    plexus_receiver.go_down()
    sleeps = Sleeps()
    uploader, buffer, _ = lane(interval=60.0, sleep=sleeps,
                               retry=RetryPolicy(retries=1, base=0.01))
    buffer.put(point(1))
    uploader.start()
    with pytest.raises(DeliveryError):
        uploader.flush(timeout=30)
    plexus_receiver.come_up()
    buffer.put(point(2))  # no flush: the reading alone wakes the uploader
    assert plexus_receiver.wait_for(2, timeout=10)
    assert values(plexus_receiver) == [1, 2]


def test_rate_ceiling_answers_are_resent_soon_and_are_not_failures(plexus_receiver_factory,
                                                                    lane):
    rx = plexus_receiver_factory(rate_limit_interval=0.3)
    sleeps = Sleeps(on_sleep=lambda n: time.sleep(0.1))
    uploader, buffer, _ = lane(rx, batch_size=1, interval=0.01, max_batch=1, sleep=sleeps,
                               rng=random.Random(6))
    uploader.start()
    for i in range(3):
        buffer.put(point(i))
    uploader.flush(timeout=30)
    assert values(rx) == [0, 1, 2]
    assert uploader.stats.failures == 0 and uploader.stats.retries == 0
    assert rx.rate_limited > 0 and sleeps.pauses
    assert all(0.05 * 0.75 <= p <= 0.15 * 1.25 for p in sleeps.pauses)


def test_a_refused_key_is_retried_at_the_auth_interval_and_reported(plexus_receiver, lane):
    changes: list[object] = []
    uploader, buffer, _ = lane(interval=60.0, auth_retry_interval=0.2,
                               on_auth_change=changes.append)
    plexus_receiver.reject_keys_next(1)
    buffer.put(point(1))
    uploader.start()
    with pytest.raises(AuthenticationError, match="refused the API key"):
        uploader.flush(timeout=10)
    assert isinstance(uploader.auth_error, AuthenticationError)
    assert plexus_receiver.wait_for(1, timeout=10)  # tried again after ~0.2 s, unasked
    assert wait(lambda: uploader.auth_error is None)
    assert [type(c) for c in changes] == [AuthenticationError, type(None)]
    assert uploader.stats.retries == 0  # no retry storm: the auth interval, not the schedule


def test_the_auth_interval_defaults_to_the_longest_retry_delay(plexus_receiver, lane):
    uploader, _, _ = lane(retry=RetryPolicy(max_delay=12.0))
    assert uploader.auth_retry_interval == 12.0
    assert lane(auth_retry_interval=0.0)[0].auth_retry_interval == 0.0


def test_a_rejected_point_is_dropped_counted_and_named(plexus_receiver_factory, lane):
    rx = plexus_receiver_factory(
        extra_check=lambda p: "value 7 is unlucky" if p.get("value") == 7 else None)
    uploader, buffer, _ = lane(rx, interval=60.0)
    buffer.put_many([point(i) for i in range(10)])
    uploader.start()
    uploader.flush(timeout=30)
    assert uploader.stats.rejected == 1 and uploader.stats.delivered == 9
    assert uploader.stats.last_rejection == "m7: points[7]: value 7 is unlucky"
    assert values(rx) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert len(buffer) == 0


# --- when batches go ----------------------------------------------------------------------


def test_a_full_batch_goes_at_once_without_waiting_for_the_interval(plexus_receiver, lane):
    uploader, buffer, _ = lane(batch_size=10, interval=60.0)
    uploader.start()
    buffer.put_many([point(i) for i in range(10)])
    assert plexus_receiver.wait_for(10, timeout=10)
    assert [r.count for r in plexus_receiver.requests] == [10]


def test_fewer_points_go_when_the_interval_passes(plexus_receiver, lane):
    uploader, buffer, _ = lane(batch_size=1000, interval=0.2)
    uploader.start()
    buffer.put_many([point(i) for i in range(3)])
    assert plexus_receiver.wait_for(3, timeout=10)


def test_no_request_carries_more_than_max_batch(plexus_receiver, lane):
    uploader, buffer, _ = lane(batch_size=1, interval=60.0, max_batch=100)
    buffer.put_many([point(i) for i in range(250)])
    uploader.start()
    uploader.flush(timeout=30)
    assert sorted(r.count for r in plexus_receiver.requests) == [50, 100, 100]
    assert values(plexus_receiver) == list(range(250))


def test_requests_are_paced_by_the_minimum_interval():
    class TimedSink(Sink):
        type_name = "timed"

        def __init__(self) -> None:
            super().__init__(None, "timed")
            self.times: list[float] = []

        def send(self, points: list[Point], key: str) -> SendResult:
            self.times.append(time.monotonic())
            return SendResult(len(points))

    sink = TimedSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=1, interval=60.0, max_batch=1,
                        min_request_interval=0.05)
    buffer.put_many([point(i) for i in range(5)])
    uploader.start()
    try:
        uploader.flush(timeout=30)
    finally:
        uploader.stop(1.0)
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert len(gaps) == 4 and min(gaps) >= 0.049


def test_after_an_outage_every_other_batch_comes_from_the_newest_end(plexus_receiver, lane):
    """Live data overtakes a backlog of more than two full batches."""
    plexus_receiver.go_down()
    uploader, buffer, _ = lane(batch_size=10_000, interval=60.0, max_batch=100,
                               retry=RetryPolicy(retries=0, base=0.01))
    uploader.start()
    buffer.put_many([point(i) for i in range(1000)])
    with pytest.raises(DeliveryError):
        uploader.flush(timeout=30)
    plexus_receiver.come_up()
    uploader.flush(timeout=30)
    firsts = [min(p["value"] for p in plexus_receiver.points[i:i + 100])
              for i in range(0, 1000, 100)]
    # The failed batch goes first again (same key), then oldest and newest alternate
    # while more than two full batches wait (200 here), then the rest oldest first.
    assert firsts == [0, 100, 900, 200, 800, 300, 700, 400, 500, 600]
    assert values(plexus_receiver) == list(range(1000))


def test_flush_times_out_with_the_points_kept(plexus_receiver, lane):
    plexus_receiver.delay = 1.0
    uploader, buffer, _ = lane(interval=60.0)
    buffer.put(point(1))
    uploader.start()
    with pytest.raises(DeliveryError, match="flush timed out; 1 points stay buffered"):
        uploader.flush(timeout=0.2)
    plexus_receiver.delay = 0.0


def test_flush_without_a_running_uploader_says_so(plexus_receiver, lane):
    uploader, buffer, _ = lane()
    buffer.put(point(1))
    with pytest.raises(DeliveryError, match="uploader for plexus is not running"):
        uploader.flush(timeout=5)
    assert uploader.flush(timeout=5) if len(buffer) == 0 else True


def test_an_empty_flush_returns_true_at_once(lane):
    uploader, _, _ = lane()
    uploader.start()
    assert uploader.flush(timeout=1) is True


def test_stop_delivers_what_is_buffered(plexus_receiver, lane):
    uploader, buffer, _ = lane(interval=60.0)
    buffer.put_many([point(i) for i in range(5)])
    uploader.start()
    assert uploader.running
    uploader.stop(10.0)
    assert not uploader.running
    assert values(plexus_receiver) == [0, 1, 2, 3, 4]


def test_stop_gives_up_at_its_deadline_when_the_platform_is_away(plexus_receiver, lane):
    plexus_receiver.go_down()
    uploader, buffer, _ = lane(interval=60.0, retry=RetryPolicy(retries=100, base=0.05))
    buffer.put(point(1))
    uploader.start()
    started = time.monotonic()
    uploader.stop(0.5)
    assert time.monotonic() - started < 5.0
    assert not uploader.running and len(buffer) == 1
    assert uploader.stats.failures >= 1 and uploader.stats.delivered == 0


# --- sinks that misbehave -------------------------------------------------------------------


class FlakySink(Sink):
    """A sink whose first sends raise what an ill-behaved plugin might raise."""

    type_name = "flaky"

    def __init__(self, failures: list[BaseException]) -> None:
        super().__init__(None, "flaky")
        self.failures = failures
        self.got: list[Point] = []

    def send(self, points: list[Point], key: str) -> SendResult:
        if self.failures:
            raise self.failures.pop(0)
        self.got.extend(points)
        return SendResult(len(points))


def test_any_exception_from_a_sink_is_a_retryable_failure():
    sink = FlakySink([RuntimeError("plugin bug"), OSError("disk")])
    buffer = MemoryBuffer()
    sleeps = Sleeps()
    uploader = Uploader(buffer, sink, interval=60.0, sleep=sleeps, rng=random.Random(1),
                        min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        uploader.flush(timeout=10)
    finally:
        uploader.stop(1.0)
    assert [p[1] for p in sink.got] == [1]
    assert uploader.stats.failures == 2 and uploader.stats.retries == 2
    assert len(sleeps.pauses) == 2


def test_the_uploader_thread_outlives_a_buffer_that_fails(plexus_receiver, caplog):
    class BrokenOnce(MemoryBuffer):
        calls = 0

        def take(self, max_points: int, newest: bool = False):  # type: ignore[no-untyped-def]
            BrokenOnce.calls += 1
            if BrokenOnce.calls == 1:
                raise PlexusError("database is locked")
            return super().take(max_points, newest)

    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    sink.open("rig-01")
    buffer = BrokenOnce()
    uploader = Uploader(buffer, sink, interval=0.05, min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        assert plexus_receiver.wait_for(1, timeout=10)
        assert uploader.running
        assert "uploader for plexus hit an unexpected error and goes on after a pause: " \
               "PlexusError: database is locked" in caplog.text
    finally:
        uploader.stop(1.0)
        sink.close()


def wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# --- from the mutation run: cycles, waits, deadlines -----------------------------------------


def test_each_failed_cycle_is_reported_and_the_next_starts_from_one_second(plexus_receiver,
                                                                           lane, caplog):
    plexus_receiver.go_down()
    sleeps = Sleeps()
    uploader, buffer, _ = lane(interval=60.0, sleep=sleeps, rng=random.Random(8),
                               retry=RetryPolicy(retries=2))
    buffer.put(point(1))
    uploader.start()
    for _ in range(2):
        with pytest.raises(DeliveryError, match="^delivery to plexus failed"):
            uploader.flush(timeout=30)
    expected = random.Random(8)
    first = [expected.uniform(0.75, 1.25), 2 * expected.uniform(0.75, 1.25)]
    expected.uniform(0.75, 1.25)  # the jittered interval after giving up
    second = [expected.uniform(0.75, 1.25), 2 * expected.uniform(0.75, 1.25)]
    assert sleeps.pauses == [*first, *second]
    assert uploader.stats.cycles_given_up == 2
    gave_up = [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"
               and r.getMessage().startswith("delivery to")]
    assert len(gave_up) == 2
    assert gave_up[0].startswith("delivery to plexus failed, keeping 1 points buffered: "
                                 "ConnectError")


def test_retries_wait_for_real_without_an_injected_sleep(plexus_receiver, lane):
    plexus_receiver.fail_next(1, status=503)
    uploader, buffer, _ = lane(interval=60.0, retry=RetryPolicy(base=0.05))
    buffer.put(point(1))
    uploader.start()
    assert uploader.flush() is True  # no timeout at all
    assert uploader.flush(timeout=10) is True
    assert values(plexus_receiver) == [1]


def test_after_a_flush_the_uploader_waits_for_a_batch_again(plexus_receiver, lane):
    uploader, buffer, _ = lane(interval=60.0, batch_size=1000)
    uploader.start()
    buffer.put(point(1))
    uploader.flush(timeout=10)
    buffer.put(point(2))  # one point, no flush: it waits for the batch size or interval
    time.sleep(0.5)
    assert values(plexus_receiver) == [1]


def test_after_giving_up_it_waits_quietly_until_a_reading_or_a_flush(plexus_receiver, lane):
    plexus_receiver.go_down()
    uploader, buffer, _ = lane(interval=60.0, retry=RetryPolicy(retries=0))
    buffer.put(point(1))
    uploader.start()
    with pytest.raises(DeliveryError):
        uploader.flush(timeout=10)
    attempts = uploader.stats.failures
    time.sleep(0.5)
    assert uploader.stats.failures == attempts  # no attempt without a reason
    plexus_receiver.come_up()
    assert uploader.flush(timeout=10)  # a later flush starts the next cycle at once
    assert values(plexus_receiver) == [1]


def test_a_failure_marks_the_sink_unhealthy_and_ends_waiting_for_room(plexus_receiver, lane):
    plexus_receiver.go_down()
    buffer = MemoryBuffer(100)
    uploader, _, _ = lane(buffer=buffer, interval=60.0, batch_size=50,
                          retry=RetryPolicy(retries=0))
    uploader.start()
    for i in range(100):
        buffer.put(point(i))
    assert wait(lambda: uploader.stats.failures >= 1)
    assert uploader.healthy is False
    done = threading.Event()

    def produce() -> None:
        for i in range(100, 150):
            buffer.put(point(i))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(10), "a producer waited for room although the sink is failing"
    assert buffer.dropped == 50


def test_a_permanently_throttled_batch_fails_after_100_quick_resends(plexus_receiver_factory,
                                                                      lane):
    rx = plexus_receiver_factory(rate_limit_interval=3600.0)
    sleeps = Sleeps()
    uploader, buffer, _ = lane(rx, interval=60.0, max_batch=1, sleep=sleeps,
                               retry=RetryPolicy(retries=0))
    buffer.put(point(0))
    uploader.start()
    uploader.flush(timeout=10)  # the first request is admitted
    buffer.put(point(1))
    for _ in range(2):
        with pytest.raises(DeliveryError, match="rate ceiling"):
            uploader.flush(timeout=30)
    # Each cycle: 100 short pauses, then a failure; the count starts afresh each time.
    short = [p for p in sleeps.pauses if p < 0.5]
    assert len(short) == 200 and uploader.stats.failures == 2


def test_a_rate_ceiling_answer_after_a_failure_is_resent(plexus_receiver_factory, lane, caplog):
    rx = plexus_receiver_factory(rate_limit_interval=0.5)
    sleeps = Sleeps(on_sleep=lambda n: time.sleep(0.02))
    uploader, buffer, _ = lane(rx, interval=60.0, sleep=sleeps)
    buffer.put(point(0))
    uploader.start()
    uploader.flush(timeout=10)
    rx.fail_next(1, status=503)
    buffer.put(point(1))
    uploader.flush(timeout=30)  # 503, then (too soon) rate-limited, then stored
    assert values(rx) == [0, 1]
    assert "unexpected error" not in caplog.text and uploader.stats.failures >= 1


def test_the_auth_wait_draws_its_jitter_from_the_same_rng(plexus_receiver, lane):
    sleeps = Sleeps()
    uploader, buffer, _ = lane(interval=60.0, batch_size=1, sleep=sleeps,
                               rng=random.Random(21), auth_retry_interval=1.0)
    plexus_receiver.reject_keys_next(1)
    buffer.put(point(1))
    uploader.start()
    assert wait(lambda: len(plexus_receiver.requests) >= 1)
    plexus_receiver.fail_next(1, status=503)  # the next try, 0.75-1.25 s after the refusal
    # No flush(): one started before the refusal is recorded would raise it.
    assert wait(lambda: len(buffer) == 0)
    expected = random.Random(21)
    expected.uniform(0.75, 1.25)  # the auth wait
    assert sleeps.pauses == [expected.uniform(0.75, 1.25)]


def test_readings_do_not_end_the_wait_after_a_refused_key(plexus_receiver_factory, lane):
    rx = plexus_receiver_factory(api_keys=["plx_other"])
    uploader, buffer, _ = lane(rx, interval=0.01, batch_size=1, auth_retry_interval=30.0)
    buffer.put(point(0))
    uploader.start()
    assert wait(lambda: len(rx.requests) >= 1)
    for i in range(1, 6):
        buffer.put(point(i))
        time.sleep(0.05)
    assert len(rx.requests) == 1  # no request per reading while the key is refused


def test_stopping_with_a_refused_key_ends_at_once(plexus_receiver_factory, lane):
    rx = plexus_receiver_factory(api_keys=["plx_other"])
    uploader, buffer, _ = lane(rx, interval=60.0, batch_size=1, auth_retry_interval=0.05)
    buffer.put(point(0))
    uploader.start()
    assert wait(lambda: len(rx.requests) >= 1)
    uploader.stop(3.0)
    assert len(rx.requests) <= 2 and not uploader.running


def test_stop_keeps_retrying_within_its_grace_period(plexus_receiver, lane):
    plexus_receiver.go_down()
    uploader, buffer, _ = lane(interval=60.0, retry=RetryPolicy(retries=100, base=0.1,
                                                                max_delay=0.2))
    buffer.put(point(1))
    uploader.start()
    threading.Timer(0.5, plexus_receiver.come_up).start()
    uploader.stop(5.0)
    assert values(plexus_receiver) == [1]


def test_stop_makes_no_attempts_after_its_deadline(plexus_receiver, lane):
    plexus_receiver.go_down()
    uploader, buffer, _ = lane(interval=60.0, retry=RetryPolicy(retries=1000, base=0.05,
                                                                max_delay=0.1))
    buffer.put(point(1))
    uploader.start()
    uploader.stop(0.5)
    # About one attempt per 0.05-0.1 s for 0.5 s; a stop that ignored its deadline
    # would go through all 1,000 retries.
    assert uploader.stats.failures < 100


# --- in-process: a byte budget and a hold, with a sink that needs no network ------------------


class CountingSink(Sink):
    """Records each request's points; reports ``cost(i)`` bytes a point for request i
    (``record_sent``), or nothing at all with ``cost=None``."""

    type_name = "counting"

    def __init__(self, cost=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(None, "counting")
        self.cost = cost
        self.requests: list[list[Point]] = []

    def send(self, points: list[Point], key: str) -> SendResult:
        if self.cost is not None:
            self.record_sent(self.cost(len(self.requests)) * len(points))
        self.requests.append(list(points))
        return SendResult(len(points))


class FailingSink(CountingSink):
    """Fails the tries numbered in ``failing`` (from 1; None: every try) with a
    retryable ``message``, and delivers the others like CountingSink."""

    def __init__(self, failing: set[int] | None = None, message: str = "503") -> None:
        super().__init__()
        self.failing, self.message = failing, message
        self.tries = 0

    def send(self, points: list[Point], key: str) -> SendResult:
        self.tries += 1
        if self.failing is None or self.tries in self.failing:
            raise RetryableSinkError(self.message)
        return super().send(points, key)


class SteppingClock:
    """A clock for the byte budget that moves ``step`` seconds at each reading."""

    def __init__(self, step: float = 1.0) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def run_until_flushed(uploader: Uploader) -> None:
    uploader.start()
    try:
        assert uploader.flush(timeout=30) is True
    finally:
        uploader.stop(1.0)


def test_with_a_byte_budget_a_batch_is_about_one_burst_of_what_a_point_cost_lately():
    # 4 bytes a point in the first request, 8 in the others. Before any request a
    # point is guessed at 8 bytes; then the cost is 0.7 x the old one + 0.3 x the new.
    sink = CountingSink(cost=lambda i: 4 if i == 0 else 8)
    budget = ByteBudget(1_000_000, 80, clock=SteppingClock())
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, budget=budget, rng=random.Random(2),
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(80)])
    run_until_flushed(uploader)
    # 80 / 8 = 10; cost 4 -> 80 / 4 = 20; 5.2 -> 15; 6.04 -> 13; 6.628 -> 12; the last 10
    assert [len(r) for r in sink.requests] == [10, 20, 15, 13, 12, 10]
    assert [p[1] for r in sink.requests for p in r] == list(range(80))
    assert budget.charged == 10 * 4 + 70 * 8 == sink.bytes_sent
    assert uploader.stats.delivered == 80 and uploader.stats.requests_ok == 6


def test_a_batch_under_a_tiny_budget_still_carries_one_point():
    sink = CountingSink(cost=lambda i: 100)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=5, min_request_interval=0.0,
                        budget=ByteBudget(1_000_000, 4, clock=SteppingClock()))
    buffer.put_many([point(i) for i in range(3)])
    run_until_flushed(uploader)
    assert [len(r) for r in sink.requests] == [1, 1, 1]


def test_a_generous_budget_still_keeps_batches_to_max_batch():
    sink = CountingSink(cost=lambda i: 1)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=7, min_request_interval=0.0,
                        budget=ByteBudget(1_000_000, 10_000, clock=SteppingClock()))
    buffer.put_many([point(i) for i in range(20)])
    run_until_flushed(uploader)
    assert [len(r) for r in sink.requests] == [7, 7, 6]


def test_a_sink_that_never_reports_is_charged_the_points_json_and_warned_about_once(caplog):
    sink = CountingSink(cost=None)
    budget = ByteBudget(1_000_000, 1_000_000, clock=SteppingClock())
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=4, budget=budget,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
        run_until_flushed(uploader)
    assert [len(r) for r in sink.requests] == [4, 4, 2]
    assert budget.charged == sum(len(orjson.dumps(r)) for r in sink.requests)
    warnings = [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"]
    assert warnings == [
        "sink counting does not report the bytes it sends (Sink.record_sent); its "
        "max_bytes_per_s is kept on an estimate (the points' JSON, or their stored size)"]


def test_a_held_lane_sends_nothing_lets_producers_drop_and_goes_once_the_hold_clears(caplog):
    holding = [True]
    sink = CountingSink()
    buffer = MemoryBuffer(10)
    uploader = Uploader(buffer, sink, interval=60.0, gate=lambda: not holding[0],
                        min_request_interval=0.0)
    caplog.set_level(logging.ERROR, logger="plexus.uploader")
    uploader.start()
    try:
        buffer.put_many([point(i) for i in range(5)])
        assert uploader.flush(timeout=10) is False  # held points wait, on purpose
        buffer.put_many([point(i) for i in range(5, 15)])  # over the cap: no wait, drops
        assert buffer.dropped == 5 and sink.requests == []
        holding[0] = False
        uploader.wake()
        assert uploader.flush(timeout=10) is True
    finally:
        uploader.stop(1.0)
    assert [p[1] for r in sink.requests for p in r] == list(range(5, 15))
    assert uploader.stats.last_error is None  # holding is no error
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_stop_leaves_held_points_in_the_buffer():
    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, gate=lambda: False, min_request_interval=0.0)
    uploader.start()
    buffer.put_many([point(i) for i in range(3)])
    uploader.stop(5.0)
    assert not uploader.running and len(buffer) == 3 and sink.requests == []


def test_health_points_go_in_their_own_requests_and_are_counted_apart():
    on_the_wire: list[float | None] = []

    class Watching(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            on_the_wire.append(uploader.sending_since)
            return super().send(points, key)

    sink = Watching()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=2, min_request_interval=0.0)
    uploader.side = MemoryBuffer(100, "drop_oldest")
    uploader.side.put_many([point(i, "gateway.health") for i in range(3)])
    buffer.put_many([point(i) for i in range(10, 12)])
    run_until_flushed(uploader)  # stopping sends the last health report
    assert [[p[1] for p in r] for r in sink.requests] == [[0, 1], [10, 11], [2]]
    assert uploader.side_delivered == 3 and len(uploader.side) == 0
    assert (uploader.stats.delivered, uploader.stats.requests_ok) == (2, 1)
    assert None not in on_the_wire and uploader.sending_since is None


def test_health_points_that_fail_stay_waiting_and_the_sink_is_still_healthy(caplog):
    class RefusesHealth(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            if points[0][0] == "gateway.health":
                raise PlexusError("no room for health points")
            return super().send(points, key)

    sink = RefusesHealth()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, min_request_interval=0.0)
    uploader.side = MemoryBuffer(100, "drop_oldest")
    uploader.side.put_many([point(i, "gateway.health") for i in range(3)])
    buffer.put_many([point(i) for i in range(10, 12)])
    with caplog.at_level(logging.DEBUG, logger="plexus.uploader"):
        run_until_flushed(uploader)
    assert [[p[1] for p in r] for r in sink.requests] == [[10, 11]]
    assert uploader.side_delivered == 0 and len(uploader.side) == 3
    assert uploader.healthy and uploader.stats.failures == 0 and uploader.stats.delivered == 2
    messages = {r.getMessage() for r in caplog.records if r.name == "plexus.uploader"}
    assert "sending health points to counting failed: no room for health points" in messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert uploader.sending_since is None


def test_join_tells_whether_the_thread_has_ended():
    uploader = Uploader(MemoryBuffer(), CountingSink(), interval=60.0)
    assert uploader.join(0.0) is True  # never started
    uploader.start()
    assert uploader.join(0.05) is False  # nothing ends it but stop()
    uploader.stop(1.0)
    assert uploader.join(1.0) is True and not uploader.running


class RecordingBuffer(MemoryBuffer):
    """A memory buffer that records the block limits the uploader sets, and can attach
    a stored body to each batch it gives out."""

    def __init__(self, body: bytes | None = None) -> None:
        super().__init__()
        self.body = body
        self.block_limits: list[int] = []

    def set_block_limit(self, points: int) -> None:
        self.block_limits.append(points)

    def take(self, max_points: int, newest: bool = False):  # type: ignore[no-untyped-def]
        batch = super().take(max_points, newest)
        if batch is not None and self.body is not None:
            batch.body = self.body
        return batch


def test_the_buffer_is_told_a_block_of_about_one_burst_before_and_after_each_request():
    sink = CountingSink(cost=lambda i: 4 if i == 0 else 8)
    buffer = RecordingBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, min_request_interval=0.0,
                        budget=ByteBudget(1_000_000, 80, clock=SteppingClock()))
    buffer.put_many([point(i) for i in range(30)])
    run_until_flushed(uploader)
    assert [len(r) for r in sink.requests] == [10, 20]
    assert buffer.block_limits == [10, 20, 15]  # the guess, then after each request


def test_a_request_that_sent_no_bytes_teaches_nothing_about_the_cost_of_a_point():
    sink = CountingSink(cost=lambda i: 0 if i == 0 else 4)
    budget = ByteBudget(1_000_000, 80, clock=SteppingClock())
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, budget=budget, min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(60)])
    run_until_flushed(uploader)
    # Still the 8-byte guess after the empty one; then 4 bytes a point: 80 / 4 = 20.
    assert [len(r) for r in sink.requests] == [10, 10, 20, 20]
    assert budget.charged == 50 * 4


def test_a_stored_body_is_charged_at_its_size_when_the_sink_does_not_report():
    sink = CountingSink(cost=None)
    budget = ByteBudget(1_000_000, 1_000_000, clock=SteppingClock())
    buffer = RecordingBuffer(body=b"z" * 50)
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=4, budget=budget,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(10)])
    run_until_flushed(uploader)
    assert len(sink.requests) == 3 and budget.charged == 3 * 50


def test_requests_wait_for_the_budget_on_its_own_clock():
    # 100 bytes a request at 1,000 bytes a second, a burst of 100: each request must
    # wait until the previous one's 100 bytes have drained, 0.1 s on the budget's clock.
    clock = SteppingClock(step=0.01)
    sends: list[float] = []

    class Stamping(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            sends.append(clock.now)
            return super().send(points, key)

    sink = Stamping(cost=lambda i: 100)
    budget = ByteBudget(1000, 100, clock=clock)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=1, budget=budget,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(4)])
    run_until_flushed(uploader)
    assert len(sends) == 4 and budget.charged == 400
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9
    assert 0 < budget.waited < 60  # seconds really spent waiting


def test_once_a_hold_clears_a_full_batch_goes_again_without_a_flush(caplog):
    caplog.set_level(logging.ERROR, logger="plexus.uploader")
    holding = [True]
    seen = threading.Event()

    def gate() -> bool:
        if threading.current_thread().name.startswith("plexus-uploader"):
            seen.set()
        return not holding[0]

    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=5, interval=60.0, gate=gate,
                        min_request_interval=0.0)
    uploader.start()
    try:
        buffer.put_many([point(i) for i in range(3)])
        assert seen.wait(10)  # the uploader has met the hold
        holding[0] = False  # no wake(): the uploader looks at the gate again on its own
        assert wait(lambda: len(sink.requests) == 1)  # what was held goes at once
        buffer.put_many([point(i) for i in range(3, 8)])  # a full batch, no flush
        assert wait(lambda: len(sink.requests) == 2)
    finally:
        uploader.stop(1.0)
    assert [len(r) for r in sink.requests] == [3, 5]
    assert uploader.stats.last_error is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_buffer_that_fails_to_acknowledge_is_logged_and_the_uploader_goes_on(caplog):
    class AckFails(MemoryBuffer):
        def ack(self, batch) -> None:  # type: ignore[no-untyped-def]
            raise OSError("disk full")

    sink = CountingSink()
    buffer = AckFails()
    uploader = Uploader(buffer, sink, interval=0.05, min_request_interval=0.0, label="lane-a")
    buffer.put(point(1))
    with caplog.at_level(logging.ERROR, logger="plexus.uploader"):
        uploader.start()
        try:
            assert wait(lambda: any(r.name == "plexus.uploader" for r in caplog.records))
            assert uploader.running and len(buffer) == 1  # sent, but still counted
        finally:
            uploader.stop(0.1)
    assert [[p[1] for p in r] for r in sink.requests] == [[1]]
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"] == [
        "acknowledging a delivered batch in the lane-a buffer failed; its points may be "
        "sent again (with the same Idempotency-Key)"]


def test_points_stuck_in_flight_do_not_make_the_uploader_spin():
    # An acknowledgement that keeps failing leaves a full batch in flight: the
    # uploader must wait between looks instead of asking the buffer again at once.
    class AckFails(MemoryBuffer):
        takes = 0

        def take(self, limit, newest=False):  # type: ignore[no-untyped-def]
            AckFails.takes += 1
            return super().take(limit, newest=newest)

        def ack(self, batch) -> None:  # type: ignore[no-untyped-def]
            raise OSError("disk full")

    sink = CountingSink()
    buffer = AckFails()
    uploader = Uploader(buffer, sink, batch_size=5, interval=0.05, min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(5)])
    uploader.start()
    try:
        assert wait(lambda: len(sink.requests) == 1)
        looks = AckFails.takes
        time.sleep(0.5)
        assert AckFails.takes - looks <= 50  # a spinning uploader looks ~100,000 times
    finally:
        uploader.stop(0.1)


def test_a_flush_tries_a_refused_key_again_at_once():
    class RefusedOnce(CountingSink):
        refused = False

        def send(self, points: list[Point], key: str) -> SendResult:
            if not self.refused:
                self.refused = True
                raise AuthenticationError("the platform refused the API key")
            return super().send(points, key)

    sink = RefusedOnce()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, auth_retry_interval=3600.0,
                        rng=random.Random(5), min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        with pytest.raises(AuthenticationError, match="refused the API key"):
            uploader.flush(timeout=10)
        assert uploader.flush(timeout=10) is True  # not an hour later
    finally:
        uploader.stop(1.0)
    assert [[p[1] for p in r] for r in sink.requests] == [[1]]


def test_stop_ends_within_its_grace_period_even_during_a_long_retry_pause():
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, FailingSink(), batch_size=1, interval=60.0,
                        min_request_interval=0.0, retry=RetryPolicy(retries=5, base=30.0, max_delay=30.0),
                        rng=random.Random(1))
    buffer.put(point(1))
    uploader.start()
    assert wait(lambda: uploader.stats.failures >= 1)  # now in a 30 s pause
    uploader.stop(0.3)  # joins for at most 0.3 + 5 s
    assert not uploader.running and len(buffer) == 1


def test_rejected_points_are_named_and_an_index_past_the_batch_is_a_question_mark(caplog):
    class Rejecting(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            super().send(points, key)
            return SendResult(len(points) - 2, [(1, "too long"), (len(points), "no such point")])

    buffer = MemoryBuffer()
    uploader = Uploader(buffer, Rejecting(), interval=60.0, min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(4)])
    with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
        run_until_flushed(uploader)
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"] == [
        "counting rejected point 'm1' and it was dropped: too long",
        "counting rejected point '?' and it was dropped: no such point"]
    assert uploader.stats.last_rejection == "?: no such point"
    assert (uploader.stats.rejected, uploader.stats.delivered) == (2, 2)
    assert buffer.loss_counts()["rejected"] == 2 and len(buffer) == 0


def test_a_sink_that_raises_is_logged_with_its_traceback_and_a_success_clears_the_error(caplog):
    class RaisesOnce(CountingSink):
        raised = False

        def send(self, points: list[Point], key: str) -> SendResult:
            if not self.raised:
                self.raised = True
                raise RuntimeError("plugin bug")
            return super().send(points, key)

    buffer = MemoryBuffer()
    uploader = Uploader(buffer, RaisesOnce(), interval=60.0, sleep=Sleeps(),
                        min_request_interval=0.0)
    buffer.put(point(1))
    before = time.time()
    with caplog.at_level(logging.DEBUG, logger="plexus.uploader"):
        run_until_flushed(uploader)
    raised = [r for r in caplog.records if r.getMessage() == "sink counting raised"]
    assert len(raised) == 1 and raised[0].exc_info is not None
    assert str(raised[0].exc_info[1]) == "plugin bug"
    stats = uploader.stats
    assert (stats.failures, stats.retries, stats.delivered) == (1, 1, 1)
    assert stats.last_error is None
    assert stats.last_success is not None and before <= stats.last_success <= time.time()


def test_rate_ceiling_pauses_are_jittered_from_the_injected_rng():
    class Throttled(CountingSink):
        answers = 2

        def send(self, points: list[Point], key: str) -> SendResult:
            if self.answers:
                self.answers -= 1
                raise RetryableSinkError("rate ceiling", retry_after=0.2)
            return super().send(points, key)

    sleeps = Sleeps()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, Throttled(), interval=60.0, sleep=sleeps, rng=random.Random(4),
                        min_request_interval=0.0)
    buffer.put(point(1))
    run_until_flushed(uploader)
    same = random.Random(4)
    assert sleeps.pauses == [0.2 * same.uniform(0.75, 1.25) for _ in range(2)]
    assert uploader.stats.failures == 0


def test_sending_since_is_set_only_while_a_request_is_on_the_wire():
    seen: list[float | None] = []

    class Watching(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            seen.append(uploader.sending_since)
            return super().send(points, key)

    buffer = MemoryBuffer()
    uploader = Uploader(buffer, Watching(), interval=60.0, min_request_interval=0.0)
    assert uploader.sending_since is None
    buffer.put(point(1))
    before = time.monotonic()
    run_until_flushed(uploader)
    assert len(seen) == 1 and seen[0] is not None and before <= seen[0] <= time.monotonic()
    assert uploader.sending_since is None


def test_a_one_byte_request_is_charged():
    sink = CountingSink(cost=lambda i: 1)
    budget = ByteBudget(1_000_000, 100, clock=SteppingClock())
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=1, budget=budget,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(3)])
    run_until_flushed(uploader)
    assert budget.charged == 3


def test_after_stop_a_full_buffer_drops_instead_of_waiting_for_room():
    buffer = MemoryBuffer(5)  # when_full="block": producers wait only while an uploader runs
    uploader = Uploader(buffer, CountingSink(), interval=60.0)
    uploader.start()
    uploader.stop(1.0)
    done = threading.Event()
    threading.Thread(target=lambda: (buffer.put_many([point(i) for i in range(5)]),
                                     buffer.put_many([point(i) for i in range(5, 8)]),
                                     done.set()), daemon=True).start()
    assert done.wait(10) and buffer.dropped == 3


def test_stop_with_no_grace_makes_no_retry():
    sleeps = Sleeps()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, FailingSink(), interval=60.0, sleep=sleeps,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(3)])
    uploader.start()
    uploader.stop(0.0)
    assert not uploader.running and len(buffer) == 3
    assert uploader.stats.retries == 0 and sleeps.pauses == []


def test_producers_wait_for_room_while_the_sink_delivers_and_again_once_it_recovers():
    sink = FailingSink({1})
    buffer = MemoryBuffer(5)
    uploader = Uploader(buffer, sink, interval=60.0, sleep=Sleeps(), min_request_interval=0.0)
    uploader.start()
    try:
        buffer.put(point(0))
        assert uploader.flush(timeout=10)  # a failure, then a success: the sink delivers
        buffer.put_many([point(i) for i in range(1, 6)])
        buffer.put(point(6))  # one over the cap: waits until the uploader makes room
        assert uploader.flush(timeout=10)
    finally:
        uploader.stop(1.0)
    assert (buffer.waited, buffer.dropped) == (1, 0)
    assert sorted(p[1] for r in sink.requests for p in r) == list(range(7))


def test_a_success_ends_the_retry_count_even_with_more_batches_waiting():
    sleeps = Sleeps()
    buffer = MemoryBuffer()
    sink = FailingSink({1, 3})  # the first try of each of the two batches
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=1, sleep=sleeps,
                        rng=random.Random(3), min_request_interval=0.0)
    buffer.put_many([point(0), point(1)])
    run_until_flushed(uploader)
    same = random.Random(3)
    assert sleeps.pauses == [same.uniform(0.75, 1.25), same.uniform(0.75, 1.25)]  # 1 s twice


def test_stop_waits_for_the_byte_budget_within_its_grace_period():
    # 100 bytes a request at 1,000 bytes a second: 0.1 s between requests.
    sink = CountingSink(cost=lambda i: 100)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=1, min_request_interval=0.0,
                        budget=ByteBudget(1000, 100))
    buffer.put_many([point(i) for i in range(3)])
    uploader.start()
    uploader.stop(5.0)
    assert len(sink.requests) == 3 and len(buffer) == 0


def test_stop_gives_up_waiting_for_the_byte_budget_at_its_deadline():
    # 1,000 bytes a request at 1 byte a second: the second request would wait 1,000 s.
    sink = CountingSink(cost=lambda i: 1000)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=1, interval=60.0, max_batch=1,
                        min_request_interval=0.0, budget=ByteBudget(1, 1))
    buffer.put_many([point(i) for i in range(3)])
    uploader.start()
    assert wait(lambda: len(sink.requests) == 1)
    uploader.stop(0.2)  # joins for at most 5.2 s
    assert not uploader.running and len(sink.requests) == 1 and len(buffer) == 2


def test_an_unexpected_error_is_logged_with_the_lane_and_kept_as_the_last_error(caplog):
    class TakeFails(MemoryBuffer):
        def take(self, max_points: int, newest: bool = False):  # type: ignore[no-untyped-def]
            raise PlexusError("database is locked")

    buffer = TakeFails()
    uploader = Uploader(buffer, CountingSink(), interval=0.05, min_request_interval=0.0,
                        label="lane-b")
    buffer.put(point(1))
    with caplog.at_level(logging.DEBUG, logger="plexus.uploader"):
        uploader.start()
        try:
            assert wait(lambda: any(r.getMessage() == "uploader error" for r in caplog.records))
            assert uploader.running
        finally:
            uploader.stop(0.1)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert messages[0] == ("uploader for lane-b hit an unexpected error and goes on after a "
                           "pause: PlexusError: database is locked")
    debug = next(r for r in caplog.records if r.getMessage() == "uploader error")
    assert debug.exc_info is not None and str(debug.exc_info[1]) == "database is locked"
    assert uploader.stats.last_error == "PlexusError: database is locked"


def test_stop_with_no_grace_sends_at_most_the_batch_under_way():
    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=1, min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(5)])
    uploader.start()
    uploader.stop(0.0)
    assert len(sink.requests) <= 1 and len(buffer) == 5 - len(sink.requests)


def test_the_uploader_defaults():
    uploader = Uploader(MemoryBuffer(), CountingSink())
    assert (uploader.batch_size, uploader.interval, uploader.max_batch,
            uploader.min_request_interval) == (1000, 1.0, 10_000, 0.002)
    assert (uploader.side, uploader.side_delivered, uploader.sending_since) == (None, 0, None)
    assert uploader.label == "counting"
    uploader.start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "plexus-uploader:counting")
        assert thread.daemon is True  # never keeps the process alive
    finally:
        uploader.stop(1.0)


def test_a_retry_is_logged_with_the_lane_the_error_and_the_pause(caplog):
    buffer = MemoryBuffer()
    sink = FailingSink({1}, message="503 from the platform")
    uploader = Uploader(buffer, sink, interval=60.0, sleep=Sleeps(), rng=random.Random(3),
                        min_request_interval=0.0, label="lane-c")
    buffer.put(point(1))
    with caplog.at_level(logging.INFO, logger="plexus.uploader"):
        run_until_flushed(uploader)
    pause = random.Random(3).uniform(0.75, 1.25)
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"] == [
        f"sending to lane-c failed (503 from the platform); retry 1/3 in {pause:.1f} s"]


def test_a_retry_goes_at_once_without_waiting_for_a_batch_or_the_interval():
    sink = FailingSink({1})
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, sleep=Sleeps(), min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        uploader.wake()  # one look at the buffer, no flush
        assert wait(lambda: len(sink.requests) == 1)
    finally:
        uploader.stop(1.0)


def test_a_permanently_throttled_first_batch_gets_exactly_100_quick_resends():
    class Throttled(CountingSink):
        def send(self, points: list[Point], key: str) -> SendResult:
            raise RetryableSinkError("rate ceiling", retry_after=0.01)

    sleeps = Sleeps()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, Throttled(), interval=60.0, sleep=sleeps,
                        retry=RetryPolicy(retries=0), min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        with pytest.raises(DeliveryError, match="rate ceiling"):
            uploader.flush(timeout=10)
    finally:
        uploader.stop(0.0)
    assert len(sleeps.pauses) == 100


def test_stopping_with_the_retries_spent_gives_up_once_and_says_why(caplog):
    sink = FailingSink(message="503 from the platform")
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, retry=RetryPolicy(retries=0),
                        min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
        uploader.stop(5.0)
    assert sink.tries == 1 and not uploader.running and len(buffer) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"] == [
        "delivery to counting failed, keeping 1 points buffered: 503 from the platform"]


def test_stopping_past_the_deadline_gives_up_and_says_why(caplog):
    looked = threading.Event()

    def gate() -> bool:  # open; tells when the uploader starts a cycle
        if threading.current_thread().name.startswith("plexus-uploader"):
            looked.set()
        return True

    buffer = MemoryBuffer()
    sink = FailingSink(message="503 from the platform")
    uploader = Uploader(buffer, sink, interval=60.0, gate=gate, sleep=Sleeps(),
                        min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    assert looked.wait(10)  # the cycle waits for a batch: stop() sends it on
    with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
        uploader.stop(0.0)
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.uploader"] == [
        "delivery to counting failed, keeping 1 points buffered: 503 from the platform"]


def test_the_uploader_goes_on_after_finding_nothing_to_take_or_a_hold_beginning():
    answers = [True, False]  # open at the cycle's start, held once it has the lock
    calls: list[int] = []

    def gate() -> bool:
        if not threading.current_thread().name.startswith("plexus-uploader"):
            return True
        calls.append(1)
        return answers.pop(0) if answers else True

    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=1, interval=0.01, gate=gate,
                        min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    try:
        assert wait(lambda: len(sink.requests) == 1)
        assert wait(lambda: len(calls) >= 10)  # empty looks every 0.01 s
        assert uploader.running
    finally:
        uploader.stop(1.0)


def test_after_giving_up_the_next_flush_tries_again_without_an_unexpected_error(caplog):
    sink = FailingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, retry=RetryPolicy(retries=0),
                        min_request_interval=0.0)
    buffer.put(point(1))
    with caplog.at_level(logging.WARNING, logger="plexus.uploader"):
        uploader.start()
        try:
            for _ in range(2):
                with pytest.raises(DeliveryError, match=r"^delivery to counting failed \(503\)"):
                    uploader.flush(timeout=10)
        finally:
            uploader.stop(0.0)
    assert sink.tries == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_backlog_alternates_oldest_and_newest_batches_while_more_than_two_batches_wait():
    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, max_batch=100, min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(1000)])
    run_until_flushed(uploader)
    # 1000 waiting: oldest, newest, oldest... until 200 or fewer wait, then oldest first.
    assert [r[0][1] for r in sink.requests] == [0, 900, 100, 800, 200, 700, 300, 600, 400, 500]


def test_exactly_a_batch_left_after_a_take_goes_without_waiting_for_the_interval():
    looked = threading.Event()

    def gate() -> bool:  # always open; tells when the uploader starts a cycle
        if threading.current_thread().name.startswith("plexus-uploader"):
            looked.set()
        return True

    sink = CountingSink()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=10, interval=60.0, max_batch=5, gate=gate,
                        min_request_interval=0.0)
    buffer.put_many([point(i) for i in range(9)])
    uploader.start()
    try:
        assert looked.wait(10)  # fewer than a batch: it goes to wait for more
        buffer.put_many([point(i) for i in range(9, 15)])  # one wake-up; then 10 are left
        assert wait(lambda: len(sink.requests) == 2)
    finally:
        uploader.stop(0.0)
    assert [len(r) for r in sink.requests[:2]] == [5, 5]


def test_a_hold_that_begins_while_waiting_for_the_budget_leaves_the_uploader_running():
    holding = [False]
    looks_while_held: list[int] = []

    def gate() -> bool:
        if holding[0] and threading.current_thread().name.startswith("plexus-uploader"):
            looks_while_held.append(1)
        return not holding[0]

    # 1,000 bytes a request at 1 byte a second: the second request waits for the budget.
    sink = CountingSink(cost=lambda i: 1000)
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, batch_size=1, interval=60.0, max_batch=1, gate=gate,
                        min_request_interval=0.0, budget=ByteBudget(1, 1))
    buffer.put_many([point(i) for i in range(3)])
    uploader.start()
    try:
        assert wait(lambda: len(sink.requests) == 1)
        holding[0] = True
        assert wait(lambda: len(looks_while_held) >= 3)  # it keeps looking at the gate
        assert uploader.running and len(sink.requests) == 1
    finally:
        uploader.stop(0.0)


def test_a_rate_ceiling_answer_while_stopping_is_resent_and_is_no_failure():
    class ThrottledOnce(CountingSink):
        throttled = False

        def send(self, points: list[Point], key: str) -> SendResult:
            if not self.throttled:
                self.throttled = True
                raise RetryableSinkError("rate ceiling", retry_after=0.01)
            return super().send(points, key)

    sink = ThrottledOnce()
    buffer = MemoryBuffer()
    uploader = Uploader(buffer, sink, interval=60.0, sleep=Sleeps(), min_request_interval=0.0)
    buffer.put(point(1))
    uploader.start()
    uploader.stop(5.0)
    assert len(sink.requests) == 1 and len(buffer) == 0
    assert (uploader.stats.failures, uploader.stats.retries) == (0, 0)
