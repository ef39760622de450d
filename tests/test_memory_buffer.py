"""The memory buffer and Batch, in detail: waiting for room, overflow episodes, keys.

Written from the mutation run of plexus/buffer.py: each test pins a
behaviour a planted bug changed without any other test noticing.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from plexus.buffer import Batch, Buffer, MemoryBuffer, in_flight_limit
from plexus.codec import IngestCodec
from plexus.point import Point


def pts(n: int, start: int = 0) -> list[Point]:
    return [("m", i, i, None) for i in range(start, start + n)]


def wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# --- Batch ------------------------------------------------------------------------------


def test_a_batch_needs_its_points_or_a_count_and_a_decoder():
    message = "^a Batch needs its points, or a count and a way to decode them$"
    with pytest.raises(ValueError, match=message):
        Batch("k")
    with pytest.raises(ValueError, match=message):
        Batch("k", count=3)
    with pytest.raises(ValueError, match=message):
        Batch("k", decode=lambda: pts(1))


def test_a_batch_keeps_what_it_was_given_and_decodes_once():
    calls: list[int] = []

    def decode() -> list[Point]:
        calls.append(1)
        return pts(3)

    batch = Batch("k", count=3, body=b"gz", codec_tag="ingest:x", decode=decode)
    assert (batch.key, batch.count, batch.body, batch.codec_tag) == ("k", 3, b"gz", "ingest:x")
    assert calls == []
    assert batch.points == pts(3) and batch.points == pts(3)
    assert calls == [1]
    assert Batch("j", pts(2)).count == 2
    assert repr(Batch("j", pts(2))) == "Batch(key='j', count=2)"


# --- options and codec ----------------------------------------------------------------------


def test_the_options_are_kept_and_checked():
    assert MemoryBuffer(10, "drop_oldest").when_full == "drop_oldest"
    assert MemoryBuffer(10).when_full == "block" and MemoryBuffer(10).max_points == 10
    with pytest.raises(ValueError, match="^max_points must be at least 1$"):
        MemoryBuffer(0)
    with pytest.raises(ValueError, match="when_full must be one of"):
        MemoryBuffer(10, "wait")  # type: ignore[arg-type]


def test_a_buffer_written_on_the_base_class_blocks_when_full_by_default():
    class Minimal(Buffer):
        def __init__(self) -> None:
            super().__init__(5)

    buffer = Minimal()
    assert (buffer.when_full, buffer.max_points) == ("block", 5)


def test_loss_counts_start_at_zero_and_add_up_drops_and_rejections():
    buffer = MemoryBuffer(5, "drop_oldest")
    assert buffer.loss_counts() == {"buffer_full": 0, "rejected": 0}
    buffer.put_many(pts(8))  # 3 over the cap
    buffer.count_rejected(2)
    buffer.count_rejected(1)
    assert buffer.loss_counts() == {"buffer_full": 3, "rejected": 3}
    assert (buffer.dropped, buffer.rejected) == (3, 3)


def test_a_buffer_keeps_the_codec_it_is_given():
    buffer = MemoryBuffer()
    codec = IngestCodec("rig-01")
    buffer.set_codec(codec)
    assert buffer.codec is codec


@pytest.mark.parametrize("cap, limit", [(1, 1), (2, 1), (3, 1), (10, 5), (10_000, 5_000)])
def test_a_batch_in_flight_holds_at_most_half_the_cap(cap, limit):
    assert in_flight_limit(cap) == limit
    buffer = MemoryBuffer(cap, "drop_oldest")
    buffer.put_many(pts(cap))
    batch = buffer.take(10**6)
    assert batch is not None and batch.count == limit


# --- keys ----------------------------------------------------------------------------------


def test_batch_keys_differ_between_buffers():
    a, b = MemoryBuffer(), MemoryBuffer()
    a.put(pts(1)[0])
    b.put(pts(1)[0])
    ka, kb = a.take(10), b.take(10)
    assert ka is not None and kb is not None and ka.key != kb.key and ka.key and kb.key


def test_a_released_batch_that_is_the_whole_queue_keeps_its_key():
    buffer = MemoryBuffer()
    buffer.put_many(pts(5))
    batch = buffer.take(5)
    assert batch is not None
    buffer.release(batch)
    again = buffer.take(100)
    assert again is not None and again.key == batch.key and again.points == batch.points


def test_two_batches_in_flight_are_both_counted():
    buffer = MemoryBuffer()
    buffer.put_many(pts(10))
    first, second = buffer.take(4), buffer.take(3)
    assert first is not None and second is not None
    assert len(buffer) == 10
    buffer.ack(first)
    assert len(buffer) == 6
    buffer.ack(second)
    assert len(buffer) == 3


# --- the ready callback ---------------------------------------------------------------------


def test_the_uploader_is_woken_when_exactly_a_batch_waits():
    calls: list[int] = []
    buffer = MemoryBuffer()
    buffer.set_ready_callback(lambda: calls.append(len(buffer)), 10)
    buffer.put_many(pts(9))
    assert calls == []
    buffer.put_many(pts(1, 9))
    assert calls == [10]
    buffer.put(pts(1, 10)[0])
    assert calls == [10]  # once per take cycle
    buffer.take(100)
    buffer.put_many(pts(9, 20))
    assert calls == [10]


def test_wake_on_next_put_wakes_for_a_single_point():
    calls: list[int] = []
    buffer = MemoryBuffer()
    buffer.set_ready_callback(lambda: calls.append(len(buffer)), 1000)
    buffer.put(pts(1)[0])
    assert calls == []
    buffer.wake_on_next_put()
    buffer.put(pts(1, 1)[0])
    assert calls == [2]
    buffer.take(100)
    buffer.put(pts(1, 2)[0])
    assert calls == [2]  # only the next put


def test_with_a_batch_in_flight_the_uploader_is_woken_at_the_batch_size_not_when_full():
    calls: list[int] = []
    buffer = MemoryBuffer(10, "drop_oldest")
    buffer.set_ready_callback(lambda: calls.append(len(buffer)), 8)
    buffer.put_many(pts(8))
    assert calls == [8]
    assert buffer.take(5) is not None  # 5 in flight, 3 waiting: room for 2 more
    buffer.put_many(pts(2, 8))  # the buffer is full, but only 5 points wait
    assert calls == [8] and buffer.dropped == 0


def test_a_buffer_without_a_ready_callback_still_takes_points():
    buffer = MemoryBuffer(5, "drop_oldest")
    buffer.wake_on_next_put()
    for point in pts(20):
        buffer.put(point)
    assert len(buffer) == 5 and buffer.dropped == 15


# --- waiting for room --------------------------------------------------------------------


def full_buffer(when_full: str = "block") -> MemoryBuffer:
    buffer = MemoryBuffer(10, when_full)  # type: ignore[arg-type]
    buffer.set_consumer_running(True)
    buffer.put_many(pts(10))
    return buffer


def producer(buffer: MemoryBuffer, point: Point) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        buffer.put(point)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_a_full_buffer_makes_the_producer_wait_until_a_batch_is_acknowledged():
    buffer = full_buffer()
    done = producer(buffer, ("m", 99, 99, None))
    assert not done.wait(0.3) and buffer.waited == 1
    batch = buffer.take(5)
    assert batch is not None and not done.wait(0.6)  # in flight still counts (0.25 s polls)
    buffer.ack(batch)
    assert done.wait(5) and buffer.dropped == 0 and len(buffer) == 6


def test_drop_oldest_never_waits():
    buffer = full_buffer("drop_oldest")
    assert producer(buffer, ("m", 99, 99, None)).wait(5)
    assert buffer.waited == 0 and buffer.dropped == 1


def test_a_failing_sink_ends_the_wait_and_the_oldest_point_goes():
    buffer = full_buffer()
    done = producer(buffer, ("m", 99, 99, None))
    assert not done.wait(0.3)
    buffer.set_healthy(False)
    assert done.wait(5) and buffer.dropped == 1
    buffer.set_healthy(True)
    assert not producer(buffer, ("m", 100, 100, None)).wait(0.3)  # waiting again


def test_a_stopped_consumer_ends_the_wait():
    buffer = full_buffer()
    done = producer(buffer, ("m", 99, 99, None))
    assert not done.wait(0.3)
    buffer.set_consumer_running(False)
    assert done.wait(5) and buffer.dropped == 1
    buffer.set_consumer_running(True)
    assert not producer(buffer, ("m", 100, 100, None)).wait(0.3)


# --- overflow episodes -------------------------------------------------------------------


def messages(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if r.name == "plexus.buffer"]


def test_an_overflow_episode_is_two_log_lines_with_exact_counts(caplog):
    buffer = MemoryBuffer(10, "drop_oldest")
    with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
        buffer.put_many(pts(13))
        buffer.put(pts(1, 13)[0])
        buffer.put(pts(1, 14)[0])
        assert buffer.dropped == 5 and len(buffer) == 10
        first = buffer.take(5)
        assert first is not None
        buffer.ack(first)  # 5 left: half the cap, the episode ends
        buffer.put_many(pts(8, 100))  # 13: a second episode
        second = buffer.take(5)
        third = buffer.take(5)
        assert second is not None and third is not None
        buffer.ack(second)
        buffer.ack(third)
    assert messages(caplog) == [
        "MemoryBuffer full (10 points): dropping the oldest points until the sink delivers "
        "again",
        "MemoryBuffer overflow ended: 5 oldest points were dropped (5 in total since start)",
        "MemoryBuffer full (10 points): dropping the oldest points until the sink delivers "
        "again",
        "MemoryBuffer overflow ended: 3 oldest points were dropped (8 in total since start)",
    ]


def test_an_episode_ends_only_at_half_the_cap_counting_what_is_in_flight(caplog):
    buffer = MemoryBuffer(10, "drop_oldest")
    with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
        buffer.put_many(pts(14))  # 4 dropped
        a, b = buffer.take(3), buffer.take(3)  # 6 in flight, 4 waiting
        assert a is not None and b is not None
        buffer.ack(a)  # 4 waiting + 3 in flight = 7: not yet
        assert len(messages(caplog)) == 1
        buffer.put_many(pts(1, 50))  # 5 waiting + 3 in flight = 8
        buffer.ack(b)  # 5 + 0 = 5: ends
    assert messages(caplog)[1:] == [
        "MemoryBuffer overflow ended: 4 oldest points were dropped (4 in total since start)"]


def test_filling_the_buffer_exactly_to_its_cap_does_not_wait():
    buffer = MemoryBuffer(10)
    buffer.set_consumer_running(True)
    done = threading.Event()

    def fill() -> None:
        for point in pts(10):
            buffer.put(point)
        done.set()

    threading.Thread(target=fill, daemon=True).start()
    assert done.wait(5) and buffer.waited == 0 and len(buffer) == 10


def test_put_many_waits_for_room_for_all_its_points():
    buffer = MemoryBuffer(10)
    buffer.set_consumer_running(True)
    buffer.put_many(pts(8))
    done = threading.Event()
    threading.Thread(target=lambda: (buffer.put_many(pts(5, 8)), done.set()),
                     daemon=True).start()
    assert not done.wait(0.6)
    batch = buffer.take(5)
    assert batch is not None
    buffer.ack(batch)
    assert done.wait(5) and len(buffer) == 8


def test_put_many_larger_than_the_cap_waits_while_the_buffer_holds_a_point():
    other = MemoryBuffer(10)
    other.set_consumer_running(True)
    other.put(pts(1)[0])
    done = threading.Event()
    threading.Thread(target=lambda: (other.put_many(pts(15, 1)), done.set()),
                     daemon=True).start()
    assert not done.wait(0.6)  # one point in it: the 15 wait for room
    other.set_consumer_running(False)
    assert done.wait(5)


def test_every_wait_for_room_is_counted():
    buffer = full_buffer()
    first = producer(buffer, ("m", 98, 98, None))
    second = producer(buffer, ("m", 99, 99, None))
    assert not first.wait(0.3) and not second.wait(0.01)
    assert buffer.waited == 2
    buffer.set_consumer_running(False)
    assert first.wait(5) and second.wait(5)


def test_a_buffer_filled_exactly_to_its_cap_drops_nothing_and_says_nothing(caplog):
    buffer = MemoryBuffer(5, "drop_oldest")
    buffer.set_ready_callback(lambda: None, 1)  # every put takes the slow path
    with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
        for point in pts(5):
            buffer.put(point)
    assert buffer.dropped == 0 and messages(caplog) == []


def test_without_a_running_consumer_a_full_buffer_drops_instead_of_waiting():
    buffer = MemoryBuffer(5)  # when_full="block", but no uploader has started
    done = threading.Event()
    threading.Thread(target=lambda: ([buffer.put(p) for p in pts(10)], done.set()),
                     daemon=True).start()
    assert done.wait(5) and buffer.dropped == 5 and buffer.waited == 0


@pytest.mark.parametrize("held, adding, seen", [
    (8, 5, 8),     # 13 would not fit: the producer waits with its points outside
    (1, 15, 1),    # more than the cap, and the buffer holds a point: the same
    (0, 15, 15),   # an empty buffer takes the block whole (it could never fit otherwise)
])
def test_put_many_waits_for_room_before_its_points_go_in_unless_the_buffer_is_empty(
        held, adding, seen):
    buffer = MemoryBuffer(10)
    buffer.set_consumer_running(True)
    buffer.put_many(pts(held))
    waiting = threading.Event()
    sizes: list[int] = []

    def about_to_wait() -> None:  # a full buffer calls it as its producer starts waiting
        sizes.append(len(buffer))
        waiting.set()

    buffer.set_ready_callback(about_to_wait, 1000)
    producer = threading.Thread(target=buffer.put_many, args=(pts(adding, 100),), daemon=True)
    producer.start()
    assert waiting.wait(10)
    assert sizes == [seen] and buffer.waited == 1
    buffer.set_consumer_running(False)  # lets the producer go
    producer.join(10)
    assert not producer.is_alive()
