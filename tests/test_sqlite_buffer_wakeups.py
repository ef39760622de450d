"""When the persistent buffer wakes its sync thread (past half a segment, at a pile of
records in memory) and when it wakes the uploader, and the producers' fast path up
to a segment's end. Each test drives a real SqliteBuffer in-process (so a mutation
run reaches it), with a sync interval of an hour: whatever moves to SQLite within
the test's seconds was moved because the buffer woke its thread."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from plexus import inbox, sqlite_buffer
from plexus.sqlite_buffer import SqliteBuffer
from tests.support import refuse_moves

T0 = 1700000000000


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def stored_points(path: Path) -> int:
    conn = sqlite3.connect(path, timeout=5)
    try:
        return conn.execute("SELECT COALESCE(SUM(count), 0) FROM blocks").fetchone()[0]
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_the_sync_thread_is_woken_once_past_half_a_segment(tmp_path, monkeypatch):
    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    # An uploader that wants a call at every put: each put_many takes the slow path.
    buf.set_ready_callback(lambda: None, at_points=1 << 40)
    try:
        size = len(buf.codec.record(pts(0, 1)[0])) + inbox.HEADER_SIZE
        per_segment = inbox.MIN_SEGMENT_BYTES // size
        chunks = [pts(0, per_segment * 4 // 10), pts(per_segment * 4 // 10, per_segment * 6 // 10),
                  pts(per_segment * 6 // 10, per_segment * 6 // 10 + 5)]
        buf.wake_on_next_put()
        buf.put_many(chunks[0])  # 40% of the segment: no reason to wake it
        time.sleep(0.5)
        assert stored_points(path) == 0 and len(inbox.segment_gens(path)) == 1
        buf.wake_on_next_put()
        buf.put_many(chunks[1])  # 60%: woken, it moves the records and makes the spare
        assert wait_until(lambda: len(inbox.segment_gens(path)) == 2)
        assert wait_until(lambda: stored_points(path) == len(chunks[0]) + len(chunks[1]))
        buf.wake_on_next_put()
        buf.put_many(chunks[2])  # woken once per segment: these wait for the next round
        time.sleep(0.5)
        assert stored_points(path) == len(chunks[0]) + len(chunks[1])
        assert len(buf) == sum(map(len, chunks))
    finally:
        buf.close()


def test_the_sync_thread_is_woken_when_the_records_in_memory_reach_the_mark(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(sqlite_buffer, "_MOVE_AT_RECORDS", 10)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        for p in pts(0, 9):
            buf.put(p)
        time.sleep(0.3)
        assert stored_points(path) == 0
        buf.put(pts(9, 10)[0])  # exactly the mark
        assert wait_until(lambda: stored_points(path) == 10)
    finally:
        buf.close()


def test_the_uploader_is_woken_again_after_each_take(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    calls: list[int] = []
    buf.set_ready_callback(lambda: calls.append(len(buf)), at_points=2)
    try:
        for round_ in range(3):
            buf.put_many(pts(2 * round_, 2 * round_ + 2))
            assert len(calls) == round_ + 1
            batch = buf.take(100)
            assert batch is not None and batch.count == 2
            buf.ack(batch)
        assert calls == [2, 2, 2]
    finally:
        buf.close()


@pytest.mark.parametrize("single", [True, False], ids=["put", "put_many"])
def test_records_fill_a_segment_to_its_seal_and_go_on_in_the_next(tmp_path, monkeypatch,
                                                                   single):
    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        size = len(buf.codec.record(pts(0, 1)[0])) + inbox.HEADER_SIZE
        n = inbox.MIN_SEGMENT_BYTES * 5 // (2 * size)  # two and a half segments
        if single:
            for p in pts(0, n):
                buf.put(p)
        else:
            for start in range(0, n, 7):
                buf.put_many(pts(start, min(n, start + 7)))
        gens = inbox.segment_gens(path)
        segments = [inbox.read_segment(inbox.segment_path(path, g), g) for g in gens]
        assert len(segments) == 3
        assert [s.sealed for s in segments] == [True, True, False]
        assert all(s.damaged_bytes == 0 for s in segments)
        assert [r for s in segments for r in s.records if r != inbox.SEAL] == \
            [buf.codec.record(p) for p in pts(0, n)]
        # Full: the next record would not have left room for the seal.
        assert all(s.end + size > inbox.MIN_SEGMENT_BYTES
                   for s in segments[:2])
        assert len(buf) == n
    finally:
        buf.close()


def test_a_waiting_producer_goes_on_as_soon_as_the_buffer_is_back_at_its_cap(tmp_path):
    import threading

    buf = SqliteBuffer(tmp_path / "b.db", max_points=4, sync_interval=3600)
    buf.set_consumer_running(True)
    try:
        buf.put_many(pts(0, 4))  # at the cap: not over it
        producer = threading.Thread(target=buf.put, args=(pts(4, 5)[0],))
        producer.start()
        producer.join(0.3)
        assert producer.is_alive()  # one over the cap: it waits
        batch = buf.take(1)
        assert batch is not None and batch.count == 1
        buf.ack(batch)  # back at the cap
        producer.join(10)
        assert not producer.is_alive() and len(buf) == 4
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_points_in_flight_from_memory_count_towards_the_uploaders_wake_up(tmp_path):
    """SQLite refuses the move (a full disk): a take sends the records from memory, and
    they still count when the buffer decides it holds enough to wake the uploader."""
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    calls: list[int] = []
    buf.set_ready_callback(lambda: calls.append(len(buf)), at_points=10)
    try:
        refuse_moves(buf)
        buf.put_many(pts(0, 6))
        batch = buf.take(100)
        assert batch is not None and batch.count == 6 and calls == []
        for p in pts(6, 10):
            buf.put(p)
        assert calls == [10]  # 6 in flight + 4 waiting: the mark, not 16
    finally:
        buf.close()


def test_an_empty_put_many_wakes_nobody(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    calls: list[int] = []
    buf.set_ready_callback(lambda: calls.append(len(buf)), at_points=1)
    try:
        buf.wake_on_next_put()
        buf.put_many([])
        assert calls == [] and len(buf) == 0
        buf.put(pts(0, 1)[0])
        assert calls == [1]
    finally:
        buf.close()


def test_points_already_in_sqlite_count_towards_the_uploaders_wake_up(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    calls: list[int] = []
    buf.set_ready_callback(lambda: calls.append(len(buf)), at_points=10)
    try:
        buf.put_many(pts(0, 6))
        buf.sync()  # 6 in SQLite
        for p in pts(6, 10):
            buf.put(p)
        assert calls == [10]
    finally:
        buf.close()


def test_a_failing_round_of_the_sync_thread_is_logged_with_the_file_and_the_error(
        tmp_path, caplog):
    import logging

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=0.05)
    try:
        refuse_moves(buf)
        with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
            buf.put(pts(0, 1)[0])
            expected = f"buffer sync of {path} failed: database or disk is full"
            assert wait_until(lambda: expected in caplog.messages)
        assert buf._thread.is_alive()  # it goes on: the next round may succeed
    finally:
        buf.close()
