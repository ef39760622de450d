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
    buffer = MemoryBuffer(5)
    for i in range(8):
        buffer.put(point(i))
    batch = buffer.take(100)
    assert batch is not None
    assert [p[1] for p in batch.points] == [3, 4, 5, 6, 7]
    assert buffer.dropped == 3


def test_cap_counts_the_batch_in_flight():
    buffer = MemoryBuffer(10)
    buffer.put_many([point(i) for i in range(10)])
    batch = buffer.take(4)
    assert batch is not None and len(buffer) == 10
    buffer.put(point(10))
    assert len(buffer) == 10 and buffer.dropped == 1
    buffer.ack(batch)
    assert len(buffer) == 6


def test_release_puts_the_batch_back_first_in_line():
    buffer = MemoryBuffer(10)
    buffer.put_many([point(i) for i in range(5)])
    batch = buffer.take(3)
    buffer.put(point(5))
    assert batch is not None
    buffer.release(batch)
    again = buffer.take(10)
    assert again is not None and [p[1] for p in again.points] == [0, 1, 2, 3, 4, 5]


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
