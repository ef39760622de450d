"""When a producer of the persistent buffer waits for room (``when_full="block"``
with the uploader running and healthy), and at which moment: before adding points
that would pass the points cap, after adding them when the batch is larger than the
whole cap, and as soon as one-at-a-time puts pass the cap; not at all exactly at the
byte cap. In-process, real files; the test plays the uploader."""

from __future__ import annotations

import threading
from collections.abc import Callable

from plexus.sqlite_buffer import SqliteBuffer
from tests.test_sqlite_buffer_wakeups import pts, wait_until


def blocking(path, **kwargs) -> SqliteBuffer:
    buf = SqliteBuffer(path, sync_interval=3600, **kwargs)
    buf.set_consumer_running(True)  # an uploader is there and the sink delivers
    return buf


def in_thread(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def deliver_until_done(buf: SqliteBuffer, producer: threading.Thread) -> None:
    """Take and acknowledge batches, as the uploader would, until the producer is through."""
    for _ in range(100):
        if not producer.is_alive():
            return
        batch = buf.take(100)
        if batch is not None:
            buf.ack(batch)
        producer.join(0.05)
    raise AssertionError("the producer never got room")


def test_a_put_many_that_would_pass_the_cap_waits_before_adding_its_points(tmp_path):
    buf = blocking(tmp_path / "b.db", max_points=10)
    try:
        buf.put_many(pts(0, 9))
        producer = in_thread(lambda: buf.put_many(pts(9, 11)))  # 9 + 2 > 10
        assert wait_until(lambda: buf.waited == 1)
        assert len(buf) == 9  # nothing added while waiting
        deliver_until_done(buf, producer)
        assert buf.dropped == 0
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_exactly_at_the_byte_cap_is_not_over_it(tmp_path):
    buf = blocking(tmp_path / "b.db")
    try:
        buf.put_many(pts(0, 9))
        buf.max_bytes = buf._bytes()
        producer = in_thread(lambda: buf.put_many(pts(9, 10)))
        producer.join(5)
        assert not producer.is_alive() and buf.waited == 0 and len(buf) == 10
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_a_batch_larger_than_the_whole_cap_goes_in_then_waits(tmp_path):
    """Waiting first would wait for room an empty buffer can never make."""
    buf = blocking(tmp_path / "b.db", max_points=10)
    try:
        producer = in_thread(lambda: buf.put_many(pts(0, 20)))
        assert wait_until(lambda: buf.waited == 1)
        assert len(buf) == 20
        deliver_until_done(buf, producer)
        assert buf.dropped == 0 and len(buf) <= 10
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_single_puts_wait_as_soon_as_they_pass_the_cap(tmp_path):
    buf = blocking(tmp_path / "b.db", max_points=10)
    try:
        buf.put_many(pts(0, 6))
        buf.sync()  # 6 in SQLite: room for 4 more before the cap
        producer = in_thread(lambda: [buf.put(p) for p in pts(6, 20)])
        assert wait_until(lambda: buf.waited == 1)
        assert len(buf) == 11  # the put that passed the cap waits, and no other came
        deliver_until_done(buf, producer)
        assert buf.dropped == 0
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_a_point_larger_than_the_byte_cap_alone_is_dropped(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)  # no uploader: drops
    try:
        buf.max_bytes = 1
        buf.put(pts(0, 1)[0])
        buf.sync()
        assert (buf.dropped, len(buf)) == (1, 0)
    finally:
        buf.close()
