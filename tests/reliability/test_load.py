"""Load at default settings: a healthy link never costs data, an outage drops the oldest.

- A burst faster than the link: with the defaults, ``send()`` waits for room
  while the platform accepts data (``when_full="block"``), so 300,000 points
  sent in a tight loop and then ``close()`` all arrive, with the memory buffer
  and with the persistent one.
- An outage: waiting ends at the first failed request, and drop-oldest means
  the oldest, including the batch waiting for its next retry.
- The retry schedule: 1 s, 2 s, 4 s (+-25%), then the next reading starts a
  new cycle; every pause jittered.
"""

from __future__ import annotations

import random
import threading

import pytest

from plexus import DeliveryError
from plexus.buffer import MemoryBuffer
from plexus.pipeline import Pipeline
from plexus.sinks.http import HttpSink
from plexus.uploader import RetryPolicy
from tests.reliability.conftest import record_figure
from tests.reliability.support import (
    FAST_RETRY,
    KEY,
    duplicates_stored,
    make_client,
    values,
    wait_until,
)

BURST = 300_000


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "persistent"])
def test_a_burst_at_default_settings_loses_nothing(plexus_receiver_factory, tmp_path,
                                                   persistent):
    rx = plexus_receiver_factory(store=False, validate=False)
    options = {"persistent_buffer": True, "buffer_path": tmp_path / "b.db"} if persistent else {}
    # Only what names the platform and the buffer file: every other setting is the default.
    from plexus import Plexus

    px = Plexus(api_key=KEY, source_id="rig-01", gateway_url=rx.url, **options)
    for i in range(BURST):
        px.send("seq", i)
    waited, dropped = px._buffer.waited, px.dropped
    px.close()
    assert dropped == 0
    assert rx.count == BURST, f"{BURST - rx.count} of {BURST} points lost"
    assert rx.duplicates == 0
    record_figure(f"burst at defaults ({'persistent' if persistent else 'memory'})",
                  {"sent": BURST, "stored": rx.count, "dropped": dropped,
                   "times send() waited for room": waited})


def test_an_outage_drops_exactly_the_oldest(plexus_receiver):
    """The issue's acceptance: 10,050 sends during an outage, then recovery: exactly
    points 50..10,049 are stored (default cap 10,000)."""
    plexus_receiver.go_down()
    # The default buffer (memory, 10,000 points). The retry pause is held open by the
    # test (an injected sleep), so the batch is certainly off the wire, waiting for
    # its retry, while the last 5,050 points arrive, however loaded the machine.
    retry_may_go = threading.Event()
    px = make_client(plexus_receiver, retry=None, sleep=lambda s: retry_may_go.wait(30))
    try:
        for i in range(5_000):
            px.send("seq", i)
        # The uploader has taken a batch and failed: the batch waits for its retry,
        # back among the waiting points, where drop-oldest can reach it.
        assert wait_until(lambda: px.stats.failures >= 1, timeout=10)
        for i in range(5_000, 10_050):
            px.send("seq", i)
        assert px.dropped == 50 and px.buffer_size() == 10_000
        plexus_receiver.come_up()
        retry_may_go.set()
        px.flush_buffer(timeout=30)
    finally:
        retry_may_go.set()
        plexus_receiver.come_up()
        px.close()
    stored = values(plexus_receiver)
    assert not duplicates_stored(stored)
    assert sorted(stored) == list(range(50, 10_050))


def _slow_receiver(factory, delay: float):  # type: ignore[no-untyped-def]
    rx = factory(store=False, validate=False)
    rx.delay = delay
    return rx


def test_a_full_buffer_waits_while_the_sink_delivers(plexus_receiver_factory):
    rx = _slow_receiver(plexus_receiver_factory, 0.02)
    px = make_client(rx, max_buffer_points=1_000, batch_size=100)
    try:
        for i in range(20_000):
            px.send("seq", i)
        assert px.dropped == 0 and px._buffer.waited > 0
        px.flush_buffer(timeout=60)
    finally:
        px.close()
    assert rx.count == 20_000


def test_with_drop_oldest_a_full_buffer_never_waits(plexus_receiver_factory):
    rx = _slow_receiver(plexus_receiver_factory, 0.05)
    px = make_client(rx, max_buffer_points=1_000, batch_size=100, when_full="drop_oldest")
    try:
        for i in range(20_000):
            px.send("seq", i)
        dropped = px.dropped
        px.flush_buffer(timeout=60)
    finally:
        px.close()
    assert px._buffer.waited == 0 and dropped > 0
    assert rx.count + dropped == 20_000


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "persistent"])
def test_waiting_for_room_ends_when_the_sink_fails(plexus_receiver, tmp_path, persistent):
    """A producer never hangs on a dead link: the first failed request ends the wait."""
    plexus_receiver.go_down()
    options = ({"persistent_buffer": True, "buffer_path": tmp_path / "b.db",
                "sync_interval": 0.05} if persistent else {})
    px = make_client(plexus_receiver, max_buffer_points=2_000, **options)
    done = threading.Event()

    def produce() -> None:
        for i in range(10_000):
            px.send("seq", i)
        done.set()

    thread = threading.Thread(target=produce, daemon=True)
    try:
        thread.start()
        assert done.wait(60), "send() still waiting for room although the sink is failing"
        # The persistent buffer trims in its sync thread: wait for it to come down.
        assert wait_until(lambda: px.buffer_size() <= 2_000, timeout=10), px.buffer_size()
        assert px.dropped + px.buffer_size() == 10_000
        assert px.dropped >= 8_000 - (px._buffer.block_points if persistent else 0)
    finally:
        plexus_receiver.come_up()
        px.close()


def test_waiting_producers_are_released_by_close(plexus_receiver_factory):
    rx = _slow_receiver(plexus_receiver_factory, 0.5)
    px = make_client(rx, max_buffer_points=100, batch_size=50, close_timeout=1)
    finished = threading.Event()

    def produce() -> None:
        try:
            for i in range(100_000):
                px.send("seq", i)
        except Exception:  # ClientClosedError once close() is through
            pass
        finished.set()

    threading.Thread(target=produce, daemon=True).start()
    assert wait_until(lambda: px._buffer.waited > 0, timeout=10)
    px.close()
    assert finished.wait(30), "a producer kept waiting after close()"


class _Sleeps:
    """An injected sleep that records the pauses and returns at once."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


def test_the_retry_schedule_is_1_2_4_seconds_jittered_then_a_new_cycle(plexus_receiver):
    """The schedule is the behaviour: asserted exactly, with a seeded jitter."""
    plexus_receiver.go_down()
    sleeps = _Sleeps()
    policy = RetryPolicy()  # the defaults: 3 retries, 1 s doubling, +-25%, cap 30 s
    pipeline = Pipeline("rig-01")
    buffer = MemoryBuffer()
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    lane = pipeline.add_lane(sink, buffer, interval=60.0, retry=policy, sleep=sleeps,
                             rng=random.Random(7))
    pipeline.start()
    try:
        pipeline.emit("seq", 0)
        with pytest.raises(DeliveryError):
            lane.uploader.flush(timeout=30)
        expected_rng = random.Random(7)
        expected = [policy.delay(n, expected_rng) for n in range(3)]
        assert sleeps.pauses == expected
        assert all(0.75 * 2**n <= p <= 1.25 * 2**n for n, p in enumerate(sleeps.pauses))
        assert lane.uploader.stats.failures == 4  # the attempt and three retries
        # The cycle gave up; the next reading starts a new one at once (the flush
        # interval here is 60 s, so only the reading can have started it).
        plexus_receiver.come_up()
        pipeline.emit("seq", 1)
        assert plexus_receiver.wait_for(2, timeout=10)
    finally:
        plexus_receiver.come_up()
        pipeline.close()
    assert sorted(values(plexus_receiver)) == [0, 1]


def test_every_pause_is_jittered_so_a_fleet_does_not_return_in_step():
    rng = random.Random(3)
    policy = RetryPolicy()
    first_retries = {round(policy.delay(0, rng), 6) for _ in range(200)}
    assert len(first_retries) == 200  # no two devices wait the same
    assert min(first_retries) >= 0.75 and max(first_retries) <= 1.25


def test_a_fleet_comes_back_after_an_outage_without_loss(plexus_receiver):
    """Twenty devices (one client each) through an outage: nothing lost, nothing
    stored twice, and every device delivers again after the platform returns. The
    timing figures (with 100+ devices) come from bench/fleet.py."""
    devices = [make_client(plexus_receiver, source_id=f"dev-{n:02d}", retry=FAST_RETRY,
                           flush_interval=0.1) for n in range(20)]
    sent = 0
    try:
        for round_ in range(30):
            if round_ == 5:
                plexus_receiver.go_down()
            if round_ == 20:
                plexus_receiver.come_up()
            for px in devices:
                px.send("seq", sent)
                sent += 1
            threading.Event().wait(0.05)
        for px in devices:
            px.flush_buffer(timeout=30)
    finally:
        plexus_receiver.come_up()
        for px in devices:
            px.close()
    stored = values(plexus_receiver)
    assert not duplicates_stored(stored)
    assert sorted(stored) == list(range(sent))
    sources = {r.source_ids[0] for r in plexus_receiver.requests if r.count}
    assert len(sources) == 20


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "persistent"])
def test_a_full_buffer_wakes_the_uploader_whatever_the_batch_size(plexus_receiver, tmp_path,
                                                                  persistent):
    """A batch size above the cap and a long interval: waiting producers must not
    wait for the interval, the full buffer itself starts an upload."""
    options = ({"persistent_buffer": True, "buffer_path": tmp_path / "b.db"}
               if persistent else {})
    px = make_client(plexus_receiver, max_buffer_points=500, batch_size=1_000_000,
                     flush_interval=3600, **options)
    done = threading.Event()

    def produce() -> None:
        for i in range(2_000):
            px.send("seq", i)
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    try:
        assert done.wait(60), "producers waited for a flush interval of an hour"
        assert px.dropped == 0
    finally:
        px.close()
    assert sorted(values(plexus_receiver)) == list(range(2_000))
