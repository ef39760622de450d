"""The memory buffer's bookkeeping: exact drop counts, the cap counting the batch in flight."""

from __future__ import annotations

import threading

from plexus.buffer import MemoryBuffer


def point(i: int):
    return ("m", i, 1700000000000, None)


def test_drops_are_counted_exactly_under_concurrent_puts():
    buffer = MemoryBuffer(1000)
    threads = [threading.Thread(target=lambda n=n: [buffer.put(point(n * 10_000 + i))
                                                    for i in range(10_000)]) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(buffer) == 1000
    assert buffer.dropped == 39_000


def test_oldest_are_dropped_first():
    buffer = MemoryBuffer(6)
    for i in range(9):
        buffer.put(point(i))
    batch = buffer.take(100)
    assert batch is not None
    assert [p[1] for p in batch.points] == [3, 4, 5]  # a batch is at most half the cap
    assert buffer.dropped == 3
    buffer.put(point(9))  # full again: the oldest *waiting* point goes, not the batch
    buffer.ack(batch)
    rest = buffer.take(100)
    assert rest is not None and [p[1] for p in rest.points] == [7, 8, 9]


def test_cap_counts_the_batch_in_flight():
    buffer = MemoryBuffer(10)
    buffer.put_many([point(i) for i in range(10)])
    batch = buffer.take(4)
    assert batch is not None and len(buffer) == 10
    buffer.put(point(10))
    assert len(buffer) == 10 and buffer.dropped == 1
    buffer.ack(batch)
    assert len(buffer) == 6


def test_release_puts_the_batch_back_first_in_line_with_its_key():
    buffer = MemoryBuffer(100)
    buffer.put_many([point(i) for i in range(5)])
    batch = buffer.take(3)
    buffer.put(point(5))
    assert batch is not None
    buffer.release(batch)
    # The same points again, under the same key: a receiver that stored the first
    # attempt (an unknown outcome) drops the repeat.
    again = buffer.take(10)
    assert again is not None and [p[1] for p in again.points] == [0, 1, 2]
    assert again.key == batch.key
    buffer.ack(again)
    rest = buffer.take(10)
    assert rest is not None and [p[1] for p in rest.points] == [3, 4, 5]


def test_a_released_batch_that_lost_points_gets_a_new_key():
    buffer = MemoryBuffer(6, when_full="drop_oldest")
    buffer.put_many([point(i) for i in range(3)])
    batch = buffer.take(3)
    assert batch is not None
    buffer.release(batch)  # waiting again: the oldest, so the first to be dropped
    for i in range(3, 7):
        buffer.put(point(i))
    assert buffer.dropped == 1
    again = buffer.take(3)
    assert again is not None and [p[1] for p in again.points] == [1, 2, 3]
    assert again.key != batch.key


def test_ready_callback_fires_once_per_take_cycle():
    buffer = MemoryBuffer(100)
    calls = []
    buffer.set_ready_callback(lambda: calls.append(len(buffer)), at_points=5)
    for i in range(20):
        buffer.put(point(i))
    assert calls == [5]
    batch = buffer.take(100)
    assert batch is not None
    buffer.ack(batch)
    for i in range(5):
        buffer.put(point(i))
    assert calls == [5, 5]


def test_batch_keys_differ_and_put_many_is_one_block():
    buffer = MemoryBuffer(100)
    buffer.put_many([point(i) for i in range(3)])
    first = buffer.take(2)
    second = buffer.take(2)
    assert first is not None and second is not None and first.key != second.key
    assert buffer.take(2) is None


def test_a_persistent_buffer_has_one_owner(tmp_path):
    import pytest

    from plexus.errors import BufferingError
    from plexus.sqlite_buffer import SqliteBuffer

    first = SqliteBuffer(tmp_path / "b.db")
    try:
        with pytest.raises(BufferingError, match="in use by another process"):
            SqliteBuffer(tmp_path / "b.db")
    finally:
        first.close()
    SqliteBuffer(tmp_path / "b.db").close()  # free again once closed


def test_take_newest_returns_the_newest_in_time_order(tmp_path):
    from plexus.sqlite_buffer import SqliteBuffer

    buffer = MemoryBuffer(100)
    buffer.put_many([point(i) for i in range(10)])
    newest = buffer.take(3, newest=True)
    assert newest is not None and [p[1] for p in newest.points] == [7, 8, 9]
    buffer.ack(newest)
    oldest = buffer.take(3)
    assert oldest is not None and [p[1] for p in oldest.points] == [0, 1, 2]
    buffer.ack(oldest)
    assert len(buffer) == 4

    # The persistent buffer stores blocks (what one move into SQLite held) and
    # takes whole ones: here three blocks of 3, 3 and 4 points.
    disk = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    for block in ([0, 1, 2], [3, 4, 5], [6, 7, 8, 9]):
        disk.put_many([point(i) for i in block])
        disk.sync()
    newest = disk.take(3, newest=True)
    assert newest is not None and [p[1] for p in newest.points] == [6, 7, 8, 9]
    disk.ack(newest)
    oldest = disk.take(3)
    assert oldest is not None and [p[1] for p in oldest.points] == [0, 1, 2]
    disk.ack(oldest)
    assert len(disk) == 3
    disk.close()


def test_live_points_overtake_a_backlog():
    import time

    from plexus.sinks.base import SendResult, Sink
    from plexus.uploader import Uploader

    class SlowSink(Sink):
        type_name = "slow"

        def __init__(self) -> None:
            super().__init__(None, "slow")
            self.batches: list[list[int]] = []

        def send(self, points, key):
            time.sleep(0.01)  # a link slower than the producer
            self.batches.append([p[1] for p in points])
            return SendResult(len(points))

    buffer = MemoryBuffer(1_000_000)
    buffer.put_many([point(i) for i in range(50_000)])  # the backlog after an outage
    sink = SlowSink()
    uploader = Uploader(buffer, sink, batch_size=1, interval=0.01, max_batch=1000)
    uploader.start()
    while not sink.batches:
        time.sleep(0.001)
    buffer.put(point(-1))  # a live reading arrives
    uploader.flush(timeout=30)
    uploader.stop(1.0)
    delivered = sorted(v for batch in sink.batches for v in batch)
    assert delivered == sorted([-1, *range(50_000)])
    live_batch = next(i for i, batch in enumerate(sink.batches) if -1 in batch)
    assert live_batch <= 3, f"the live point waited behind {live_batch} backlog batches"


def test_persistent_batch_keys_never_repeat_even_after_the_buffer_empties(tmp_path):
    from plexus.sqlite_buffer import SqliteBuffer

    buffer = SqliteBuffer(tmp_path / "b.db")
    keys = set()
    for _ in range(3):
        buffer.put_many([point(i) for i in range(10)])
        batch = buffer.take(100)
        assert batch is not None and batch.key not in keys
        keys.add(batch.key)
        buffer.ack(batch)
        assert len(buffer) == 0
    buffer.close()
    reopened = SqliteBuffer(tmp_path / "b.db")
    reopened.put(point(0))
    batch = reopened.take(10)
    assert batch is not None and batch.key not in keys
    reopened.close()
