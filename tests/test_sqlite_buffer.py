"""The persistent buffer's bookkeeping, exactly: owners, loss counts, block sizes,
stats of a file not taken over, waiting for room, damaged blocks, files of earlier
schemas. Each test drives a real SqliteBuffer in tmp_path (in-process, so a
mutation run reaches it)."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from plexus import inbox
from plexus.codec import decompress
from plexus.sqlite_buffer import SqliteBuffer, buffer_stats, recorded_owner
from tests.support import Refusing

T0 = 1700000000000


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def blocks(path: Path) -> list[tuple[int, int]]:
    """(id, count) of each stored block, in id order."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, count FROM blocks ORDER BY id").fetchall()
    finally:
        conn.close()


def test_repr_names_the_file_and_the_points(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))
        assert repr(buf) == f"SqliteBuffer({str(tmp_path / 'b.db')!r}, points=3)"
    finally:
        buf.close()


def test_the_first_claim_owns_the_file(tmp_path):
    path = tmp_path / "b.db"
    assert recorded_owner(path) is None  # no file
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.close()
    assert recorded_owner(path) is None  # a file nobody claimed
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.claim("sink-a")
    buf.claim("sink-b")  # a second claim changes nothing
    buf.close()
    assert recorded_owner(path) == "sink-a"
    (tmp_path / "other.db").write_bytes(b"not a database at all" * 100)
    assert recorded_owner(tmp_path / "other.db") is None


def test_loss_counts_are_stored_with_the_acknowledgement(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    assert buf.loss_counts() == {"buffer_full": 0, "rejected": 0}
    buf.put_many(pts(0, 10))
    batch = buf.take(100)
    assert batch is not None and batch.count == 10
    buf.count_rejected(4)
    assert buf.rejected == 4
    assert buf.loss_counts() == {"buffer_full": 0, "rejected": 4}
    buf.ack(batch)
    buf.count_rejected(1)  # not acknowledged yet: stored at close
    buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.loss_counts() == {"buffer_full": 0, "rejected": 5}
    finally:
        again.close()


def test_block_limit_sets_the_points_per_block(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, max_points=40, sync_interval=3600)
    try:
        assert buf.block_points == 10  # a quarter of the cap
        buf.set_block_limit(3)
        assert buf.block_points == 3
        buf.put_many(pts(0, 7))
        buf.sync()
        assert [c for _, c in blocks(path)] == [3, 3, 1]
        buf.set_block_limit(100)
        assert buf.block_points == 10  # never over a quarter of the cap
        buf.put_many(pts(7, 19))
        buf.sync()
        assert [c for _, c in blocks(path)] == [3, 3, 1, 10, 2]
        buf.set_block_limit(0)
        assert buf.block_points == 1
    finally:
        buf.close()
    big = SqliteBuffer(tmp_path / "c.db", sync_interval=3600)
    try:
        big.set_block_limit(50_000)
        assert big.block_points == 10_000  # never over what a request may carry
    finally:
        big.close()


def test_records_go_straight_from_memory_while_sqlite_takes_nothing(tmp_path, monkeypatch):
    from plexus import inbox

    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        points = pts(0, 5)
        buf.put_many(points)
        size = sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE for p in points)
        assert buf.stored_bytes == size

        def refuse(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(buf, "_insert_blocks", refuse)
        batch = buf.take(3)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2]
        assert batch.codec_tag == "points"
        assert decompress(batch.body) == buf.codec.block([buf.codec.record(p)
                                                          for p in points[:3]])
        assert re.fullmatch(r"[0-9a-f]{12}-mem-[0-9a-f]{8}", batch.key)
        assert buf.stored_bytes == size - sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE
                                              for p in points[:3])
        assert len(buf) == 5
        buf.release(batch)
        assert buf.stored_bytes == size and len(buf) == 5
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2, 3, 4]
        assert buf.stored_bytes == 0
        buf.ack(batch)
        assert len(buf) == 0
        monkeypatch.undo()
    finally:
        buf.close()


def test_take_returns_whole_blocks_up_to_the_limit(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(3)
        buf.put_many(pts(0, 10))
        buf.sync()
        batch = buf.take(7)
        assert batch is not None
        assert [p[1] for p in batch.points] == list(range(6))  # 2 blocks of 3; 3 would be 9
        first = blocks(path)[0][0]
        assert batch.key.endswith(f"-{first}-{first + 1}-6")
        buf.ack(batch)
        newest = buf.take(3, newest=True)
        assert newest is not None
        assert [p[1] for p in newest.points] == [9]  # the newest block alone; 3 more would be 4
        buf.ack(newest)
        rest = buf.take(100)
        assert rest is not None and [p[1] for p in rest.points] == [6, 7, 8]
        buf.ack(rest)
        assert len(buf) == 0 and buf.take(100) is None
    finally:
        buf.close()


def test_stats_of_a_buffer_describe_blocks_and_inbox(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.set_block_limit(3)
    buf.put_many(pts(5, 25))
    buf.count_rejected(2)
    batch = buf.take(3)
    assert batch is not None
    buf.ack(batch)
    buf.close()
    stats = buffer_stats(path)
    assert stats["path"] == str(path)
    assert stats["points"] == 17
    assert (stats["oldest_ms"], stats["newest_ms"]) == (T0 + 8, T0 + 24)
    assert stats["losses"] == {"rejected": 2}
    assert stats["bytes"] == path.stat().st_size
    # Records still in the inbox (a buffer that did not close): counted once, the
    # part already moved into SQLite (before the recorded position) not again.
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(40, 44))
        buf.sync()
        buf.put_many(pts(44, 46))
        stats = buffer_stats(path)
        assert stats["points"] == len(buf) == 23
        assert (stats["oldest_ms"], stats["newest_ms"]) == (T0 + 8, T0 + 45)
        wal = Path(f"{path}-wal").stat().st_size
        assert wal > 0
        segments = [inbox.read_segment(inbox.segment_path(path, g), g).end
                    for g in inbox.segment_gens(path)]
        assert len(segments) == 1
        assert stats["bytes"] == path.stat().st_size + wal + segments[0]
    finally:
        buf.close()


def test_stats_of_a_buffer_of_schema_2(tmp_path):
    path = tmp_path / "b.db"
    _old_buffer(path, rows=5, inboxes={})
    stats = buffer_stats(path)
    assert (stats["points"], stats["oldest_ms"], stats["newest_ms"], stats["losses"]) == \
        (5, None, None, {})


def test_stats_of_an_empty_buffer(tmp_path):
    path = tmp_path / "b.db"
    SqliteBuffer(path, sync_interval=3600).close()
    stats = buffer_stats(path)
    assert (stats["points"], stats["oldest_ms"], stats["newest_ms"], stats["losses"]) == \
        (0, None, None, {})


def test_a_producer_waits_for_room_while_the_sink_delivers(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", max_points=4, sync_interval=3600)
    woken: list[int] = []
    buf.set_ready_callback(lambda: woken.append(1), at_points=1_000)
    buf.set_consumer_running(True)
    try:
        buf.put_many(pts(0, 4))
        assert woken == []
        done = threading.Event()

        def produce() -> None:
            buf.put_many(pts(4, 6))
            done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        assert not done.wait(0.5)  # no room: it waits (and wakes the uploader)
        batch = buf.take(100)
        assert batch is not None and batch.count == 2  # half the cap
        buf.ack(batch)
        producer.join(10)
        assert done.is_set()
        assert buf.waited == 1 and woken
        assert len(buf) == 4 and buf.dropped == 0
    finally:
        buf.set_consumer_running(False)
        buf.close()


def stored_block_bytes(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blocks").fetchone()[0]
    finally:
        conn.close()


def _damaged_file(path: Path, damaged: list[int]) -> list[int]:
    """A closed buffer of points 0..5 in three blocks of two, the blocks at the
    positions ``damaged`` failing their CRC; returns the blocks' ids."""
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.set_block_limit(2)
    buf.put_many(pts(0, 6))
    buf.close()
    ids = [i for i, _ in blocks(path)]
    conn = sqlite3.connect(path)
    conn.executemany("UPDATE blocks SET crc = crc + 1 WHERE id = ?",
                     [(ids[n],) for n in damaged])
    conn.commit()
    conn.close()
    return ids


def test_a_damaged_block_is_set_aside_and_counted(tmp_path, caplog):
    path = tmp_path / "b.db"
    ids = _damaged_file(path, [0])
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 6
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [2, 3, 4, 5]
        assert buf.lost == {"unreadable": 2}
        assert buf.loss_counts() == {"buffer_full": 0, "rejected": 0, "unreadable": 2}
        assert len(buf) == 4
        assert buf.stored_bytes == stored_block_bytes(path)
        assert (f"2 points in {path} could not be read back; their blocks were set aside "
                f"(table set_aside, ids [{ids[0]}]) and counted as lost; delivery goes on"
                ) in caplog.messages
        buf.ack(batch)
        assert blocks(path) == []  # deleted by the acknowledgement itself
        conn = sqlite3.connect(path)
        try:  # and the record of the batch in flight with them
            assert conn.execute("SELECT value FROM meta WHERE key = 'in_flight'").fetchall() == []
        finally:
            conn.close()
    finally:
        buf.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT id, reason FROM set_aside").fetchall() == \
            [(ids[0], "unreadable block: CRC mismatch")]
        assert conn.execute("SELECT name, value FROM counters").fetchall() == [("unreadable", 2)]
    finally:
        conn.close()


@pytest.mark.parametrize("drop", ["drop_oldest"])
def test_dropped_blocks_are_counted_and_stored(tmp_path, drop):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, max_points=8, sync_interval=3600, when_full=drop)
    buf.put_many(pts(0, 8))
    buf.sync()
    assert [c for _, c in blocks(path)] == [2, 2, 2, 2]
    buf.put_many(pts(8, 11))
    buf.sync()
    assert buf.dropped == 4  # two whole blocks
    assert len(buf) == 7
    buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.loss_counts() == {"buffer_full": 4, "rejected": 0}
        batch = again.take(100)
        assert batch is not None and [p[1] for p in batch.points] == list(range(4, 11))
    finally:
        again.close()


def test_a_block_of_an_unknown_layout_is_set_aside_with_the_reason_cut_to_200(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 3))
    buf.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE blocks SET codec = ?", ("x" * 300,))
    conn.commit()
    conn.close()
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert buf.take(100) is None
        assert buf.lost == {"unreadable": 3} and len(buf) == 0
    finally:
        buf.close()
    conn = sqlite3.connect(path)
    try:
        (reason,) = conn.execute("SELECT reason FROM set_aside").fetchone()
    finally:
        conn.close()
    assert reason == ("unreadable block: unknown block layout '" + "x" * 300)[:200]


def test_the_ready_callback_fires_once_per_take_and_on_request(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    calls: list[int] = []
    buf.set_ready_callback(lambda: calls.append(len(buf)), at_points=3)
    buf.set_consumer_running(True)
    try:
        buf.put(pts(0, 1)[0])
        buf.put(pts(1, 2)[0])
        assert calls == []
        buf.put(pts(2, 3)[0])
        assert calls == [3]
        buf.put_many(pts(3, 5))
        assert calls == [3]  # woken already: once until it takes
        batch = buf.take(100)
        assert batch is not None and batch.count == 5
        buf.ack(batch)
        buf.put(pts(5, 6)[0])
        assert calls == [3]  # one point waits, fewer than 3
        buf.wake_on_next_put()
        buf.put(pts(6, 7)[0])
        assert calls == [3, 2]
        buf.put(pts(7, 8)[0])
        assert calls == [3, 2]
        assert buf.waited == 0
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_the_first_file_moved_aside_gets_a_free_name(tmp_path, monkeypatch, caplog):
    import time

    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "STAMP" if fmt == "%Y%m%dT%H%M%S"
                        else real(fmt, *a))
    path = tmp_path / "b.db"
    # A database of something else, its WAL and shared memory kept by an open connection.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("PRAGMA wal_autocheckpoint=0")
    other.execute("CREATE TABLE other (x)")
    other.execute("INSERT INTO other VALUES (42)")
    (tmp_path / "b.db.corrupt-STAMP").write_bytes(b"older")
    (tmp_path / "b.db.corrupt-STAMP-1").write_bytes(b"older still")
    try:
        SqliteBuffer(path, sync_interval=3600).close()
        aside = tmp_path / "b.db.corrupt-STAMP-2"
        assert Path(f"{aside}-wal").stat().st_size > 0
        assert Path(f"{aside}-shm").exists()
    finally:
        other.close()
    conn = sqlite3.connect(aside)
    try:
        assert conn.execute("SELECT x FROM other").fetchall() == [(42,)]
    finally:
        conn.close()
    assert (tmp_path / "b.db.corrupt-STAMP").read_bytes() == b"older"
    assert (tmp_path / "b.db.corrupt-STAMP-1").read_bytes() == b"older still"


def _old_buffer(path: Path, rows: int, inboxes: dict[int, bytes], gen: int = 3) -> None:
    """A buffer of schema 2: one row per point, inbox files of (length, CRC, payload)."""
    import orjson

    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("CREATE TABLE points (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL)")
    conn.executemany("INSERT INTO points (data) VALUES (?)",
                     [(orjson.dumps(("seq", i, T0 + i, None)),) for i in range(rows)])
    conn.execute("INSERT INTO meta VALUES ('schema', '2'), ('uuid', 'abc'), "
                 "('inbox_gen', ?), ('inbox_offset', '0')", (str(gen),))
    conn.commit()
    conn.close()
    for n, blob in inboxes.items():
        Path(f"{path}.inbox.{n}").write_bytes(blob)


def _old_records(values: range | list[int], crc_off: int = 0) -> bytes:
    import struct
    import zlib

    import orjson

    out = b""
    for i in values:
        data = orjson.dumps(("seq", i, T0 + i, None))
        out += struct.pack("<II", len(data), zlib.crc32(data) + crc_off) + data
    return out


def _old_raw(payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_point_rows_of_schema_2_become_blocks(tmp_path, caplog):
    path = tmp_path / "b.db"
    _old_buffer(path, rows=5, inboxes={})
    caplog.set_level("INFO", logger="plexus.buffer")
    buf = SqliteBuffer(path, max_points=8, sync_interval=3600)  # blocks of 2
    try:
        assert len(buf) == 5
        assert [c for _, c in blocks(path)] == [2, 2, 1]
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2, 3]
    finally:
        buf.close()
    assert f"converted the buffer {path} to schema 4" in caplog.messages


def test_old_inbox_records_are_read_to_the_last_whole_one(tmp_path):
    path = tmp_path / "b.db"
    # Ends exactly at a record's end; a record of one byte counts too.
    _old_buffer(path, rows=0, inboxes={3: _old_raw(b"7") + _old_records(range(4))})
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 5 and buf.torn_records == 0 and buf.lost == {}
    finally:
        buf.close()


def test_old_inbox_stops_at_a_bad_crc_or_a_short_tail(tmp_path):
    path = tmp_path / "b.db"
    blob = _old_records(range(3)) + _old_records([3], crc_off=1) + _old_records(range(4, 6))
    _old_buffer(path, rows=0, inboxes={3: blob})
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 3 and buf.torn_records == 1
    finally:
        buf.close()
    path = tmp_path / "c.db"
    _old_buffer(path, rows=0, inboxes={3: _old_records(range(3)) + b"\x05\x00\x00"})
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 3 and buf.torn_records == 1
    finally:
        buf.close()


def test_old_inbox_records_of_the_largest_size_are_kept(tmp_path):
    from plexus import inbox

    path = tmp_path / "b.db"
    _old_buffer(path, rows=0, inboxes={3: _old_raw(b"x" * inbox.MAX_RECORD)
                                       + _old_raw(b"x" * (inbox.MAX_RECORD + 1))})
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 1 and buf.torn_records == 1
    finally:
        buf.close()


def test_every_old_inbox_file_counts_as_sealed(tmp_path):
    path = tmp_path / "b.db"
    _old_buffer(path, rows=0, inboxes={3: _old_records(range(2)), 4: _old_records(range(2, 5))})
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(buf) == 5 and buf.lost == {}
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2, 3, 4]
    finally:
        buf.close()


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inbox segment can be made (ENOSPC), and no early wake-up of the sync
    thread: records stay in memory until a take."""
    from plexus import inbox, sqlite_buffer

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inbox, "Segment", no_room)
    monkeypatch.setattr(sqlite_buffer, "_MOVE_AT_RECORDS", 1 << 40)


def test_a_full_disk_keeps_points_in_memory_up_to_the_limit(tmp_path, monkeypatch, caplog):
    from plexus import inbox, sqlite_buffer

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        _disk_full(monkeypatch)
        points = pts(0, 5)
        buf.put_many(points)
        assert buf.spilled == 5 and len(buf) == 5
        assert buf.stored_bytes == sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE
                                       for p in points)
        assert (f"cannot make a buffer file beside {path} ([Errno 28] No space left on "
                "device): keeping points in memory (at most 100000) until the disk has "
                "room again") in caplog.messages
        many = sqlite_buffer._SPILL_MAX_POINTS
        buf.put_many(pts(5, many + 3))
        assert buf.spilled == many + 3 and len(buf) == many
        assert buf.dropped == 3
        assert buf.loss_counts() == {"buffer_full": 3, "rejected": 0}
        assert buf.stored_bytes == sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE
                                       for p in pts(3, many + 3))
        monkeypatch.undo()
        batch = buf.take(4)
        assert batch is not None and [p[1] for p in batch.points][:2] == [3, 4]
        buf.ack(batch)
    finally:
        buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.loss_counts()["buffer_full"] == 3
    finally:
        again.close()


def test_a_damaged_block_that_cannot_be_set_aside_is_skipped(tmp_path, caplog):
    path = tmp_path / "b.db"
    _damaged_file(path, [0])
    buf = SqliteBuffer(path, sync_interval=3600)
    real = buf._conn
    try:
        buf._conn = Refusing(real, "INSERT OR REPLACE INTO set_aside",  # type: ignore[assignment]
                              "database or disk is full")
        first = buf.take(2)
        assert first is not None and [p[1] for p in first.points] == [2, 3]
        assert (f"could not set aside unreadable blocks of {path}: database or disk is full"
                in caplog.messages)
        assert buf.lost == {"unreadable": 2} and len(buf) == 4
        buf.ack(first)
        second = buf.take(100)  # the damaged block stays skipped
        assert second is not None and [p[1] for p in second.points] == [4, 5]
        buf.ack(second)
        assert len(buf) == 0
    finally:
        buf._conn = real
        buf.close()


def test_a_failed_trim_when_a_batch_is_given_back_is_logged(tmp_path, monkeypatch, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))
        batch = buf.take(100)
        assert batch is not None

        def boom() -> None:
            raise sqlite3.OperationalError("boom")

        monkeypatch.setattr(buf, "_trim", boom)
        buf.release(batch)
        assert f"trimming {path} failed: boom" in caplog.messages
        assert [r.levelname for r in caplog.records if "trimming" in r.message] == ["WARNING"]
        monkeypatch.undo()
        again = buf.take(100)
        assert again is not None and again.key == batch.key
        buf.ack(again)
    finally:
        buf.close()


def test_single_puts_count_their_framed_bytes(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        for p in pts(0, 3):
            buf.put(p)
        assert buf.stored_bytes == sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE
                                       for p in pts(0, 3))
        assert len(buf) == 3
    finally:
        buf.close()


def test_a_second_file_moved_aside_in_the_same_second_gets_suffix_1(tmp_path, monkeypatch):
    import time

    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "STAMP" if fmt == "%Y%m%dT%H%M%S"
                        else real(fmt, *a))
    path = tmp_path / "b.db"
    path.write_bytes(b"garbage " * 1000)
    (tmp_path / "b.db.corrupt-STAMP").write_bytes(b"older")
    SqliteBuffer(path, sync_interval=3600).close()
    assert (tmp_path / "b.db.corrupt-STAMP-1").read_bytes() == b"garbage " * 1000


def test_losses_of_one_reason_add_up(tmp_path):
    path = tmp_path / "b.db"
    _damaged_file(path, [0, 2])
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        first = buf.take(2)
        assert first is not None and [p[1] for p in first.points] == [2, 3]
        buf.ack(first)
        assert buf.take(2) is None  # the last block was damaged too
        assert buf.lost == {"unreadable": 4}
        assert buf.loss_counts()["unreadable"] == 4
    finally:
        buf.close()


def test_batches_of_blocks_carry_their_body_and_layout(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(2)
        points = pts(0, 5)
        buf.put_many(points)
        records = [buf.codec.record(p) for p in points]
        one = buf.take(2)  # a single block: as stored
        assert one is not None and one.codec_tag == "points"
        assert decompress(one.body) == buf.codec.block(records[:2])
        with pytest.raises(RuntimeError, match="^SqliteBuffer holds one batch in flight at a "
                                               "time$"):
            buf.take(2)
        buf.ack(one)
        two = buf.take(100)  # two blocks joined into one body
        assert two is not None and two.codec_tag == "points"
        assert decompress(two.body) == buf.codec.block(records[2:])
        buf.ack(two)
    finally:
        buf.close()


def test_blocks_that_cannot_be_joined_are_set_aside_together(tmp_path):
    import zlib

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.set_block_limit(2)
    buf.put_many(pts(0, 6))
    buf.close()
    ids = [i for i, _ in blocks(path)]
    conn = sqlite3.connect(path)  # not gzip, with a matching CRC: fails only when read
    conn.execute("UPDATE blocks SET data = ?, crc = ? WHERE id = ?",
                 (b"not gzip", zlib.crc32(b"not gzip"), ids[1]))
    conn.commit()
    conn.close()
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        batch = buf.take(4)  # blocks 1 and 2 together: neither is sent
        assert batch is not None and [p[1] for p in batch.points] == [4, 5]
        assert buf.lost == {"unreadable": 4} and len(buf) == 2
        buf.ack(batch)
    finally:
        buf.close()
    conn = sqlite3.connect(path)
    try:
        aside = conn.execute("SELECT id, reason, data FROM set_aside ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in aside] == ids[:2]
    assert aside[1][2] == b"not gzip"
    assert all(r[1].startswith("unreadable block: damaged block") for r in aside)


def test_stats_take_the_stamps_of_the_first_and_last_point_of_a_block(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many([("seq", i, T0 + ts, None) for i, ts in enumerate([5, 1, 9, 3])])
    buf.close()
    stats = buffer_stats(path)  # not a scan: the edges of the edge blocks
    assert (stats["points"], stats["oldest_ms"], stats["newest_ms"]) == (4, T0 + 3, T0 + 5)


def test_joined_blocks_stay_under_the_raw_byte_cap(tmp_path, monkeypatch):
    from plexus import sqlite_buffer

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(3)
        buf.put_many(pts(0, 9))
        buf.sync()
        conn = sqlite3.connect(path)
        try:
            raw = [r[0] for r in conn.execute("SELECT raw_bytes FROM blocks ORDER BY id")]
        finally:
            conn.close()
        assert len(raw) == 3 and raw[0] == raw[1] == raw[2] > 0
        # Exactly two blocks' raw bytes: two are joined (the sum may equal the cap),
        # the third would pass it.
        monkeypatch.setattr(sqlite_buffer, "_BATCH_RAW_BYTES", raw[0] + raw[1])
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == list(range(6))
        buf.ack(batch)
        rest = buf.take(100)
        assert rest is not None and [p[1] for p in rest.points] == [6, 7, 8]
        buf.ack(rest)
    finally:
        buf.close()


def test_put_many_appends_in_place_and_counts_its_framed_bytes(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        for start in (0, 3, 6):  # the first opens the segment, the others append to it
            buf.put_many(pts(start, start + 3))
        assert buf.stored_bytes == sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE
                                       for p in pts(0, 9))
        gens = inbox.segment_gens(path)
        assert len(gens) == 1
        seg = inbox.read_segment(inbox.segment_path(path, gens[0]), gens[0])
        assert seg.records == [buf.codec.record(p) for p in pts(0, 9)]
        assert len(buf) == 9
    finally:
        buf.close()


def test_acknowledged_blocks_leave_the_stored_bytes(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(3)
        buf.put_many(pts(0, 9))
        buf.sync()
        assert buf.stored_bytes == stored_block_bytes(path) > 0
        batch = buf.take(3)
        assert batch is not None and batch.count == 3
        buf.ack(batch)
        assert buf.stored_bytes == stored_block_bytes(path) > 0
        assert len(buf) == 6
    finally:
        buf.close()


def test_an_overflow_episode_ends_once_half_the_cap_is_left(tmp_path, caplog):
    import logging

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, max_points=6, sync_interval=3600, when_full="drop_oldest")
    try:
        buf.set_block_limit(1)
        buf.put_many(pts(0, 6))
        buf.sync()
        buf.put_many(pts(6, 7))
        buf.sync()
        assert buf.dropped == 1 and len(buf) == 6
        with caplog.at_level(logging.WARNING):
            for left in (5, 4, 3):
                caplog.clear()
                batch = buf.take(1)
                assert batch is not None
                buf.ack(batch)
                assert len(buf) == left
                ended = [r.getMessage() for r in caplog.records if "overflow ended" in r.getMessage()]
                # 3 of 6 is half the cap: the episode ends there, not before
                assert ended == ([] if left > 3 else [
                    "SqliteBuffer overflow ended: 1 oldest points were dropped (1 in total since start)"])
    finally:
        buf.close()


def _set_meta(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path, timeout=5)
    try:
        conn.execute(sql, args)
        conn.commit()
    finally:
        conn.close()


def test_stats_read_the_inbox_from_the_recorded_position(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 4))
        buf.sync()  # 4 in a block, the position past them recorded
        buf.put_many(pts(4, 6))  # 2 in the inbox only
        assert buffer_stats(path)["points"] == 6
        (gen,) = inbox.segment_gens(path)
        # An inbox generation past this segment: all of it is in SQLite already.
        _set_meta(path, "UPDATE meta SET value = ? WHERE key = 'inbox_gen'", str(gen + 1))
        assert buffer_stats(path)["points"] == 4
        # No recorded offset in this segment: read from its start (the 4 moved count again).
        _set_meta(path, "UPDATE meta SET value = ? WHERE key = 'inbox_gen'", str(gen))
        _set_meta(path, "DELETE FROM meta WHERE key = 'inbox_offset'")
        assert buffer_stats(path)["points"] == 4 + 6
        # A segment past the recorded generation: all of it from its start.
        _set_meta(path, "UPDATE meta SET value = ? WHERE key = 'inbox_gen'", str(gen - 1))
        assert buffer_stats(path)["points"] == 4 + 6
        _set_meta(path, "DELETE FROM meta WHERE key = 'inbox_gen'")  # no position at all
        assert buffer_stats(path)["points"] == 4 + 6
    finally:
        buf.close()


def test_records_after_an_unreadable_segment_are_counted_as_lost_after_a_gap(tmp_path,
                                                                              monkeypatch):
    import shutil

    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    crashed.mkdir()
    buf = SqliteBuffer(live / "b.db", sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))  # in the inbox only
        for f in live.iterdir():  # the files as a crash leaves them
            shutil.copy(f, crashed / f.name)
    finally:
        buf.close()
    path = crashed / "b.db"
    (gen,) = inbox.segment_gens(path)
    shutil.copy(inbox.segment_path(path, gen), inbox.segment_path(path, gen + 1))
    real = inbox.read_segment

    def unreadable(p: Path, g: int, start: int = 0) -> inbox.ReadSegment:
        if g == gen:
            raise OSError("I/O error")
        return real(p, g, start)

    monkeypatch.setattr(inbox, "read_segment", unreadable)
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.lost == {"after a gap": 3}
        assert again.loss_counts() == {"buffer_full": 0, "rejected": 0, "after_gap": 3}
        assert len(again) == 0
    finally:
        again.close()


def test_a_failed_move_takes_blocks_first_then_records_from_memory(tmp_path, monkeypatch,
                                                                    caplog):
    import logging

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(1)
        buf.put_many(pts(0, 2))
        buf.sync()  # two blocks of one
        buf.put_many(pts(2, 5))  # three records in memory

        def refuse(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(buf, "_insert_blocks", refuse)
        got = []
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                batch = buf.take(1)  # a limit of 1 is one point, blocks before memory
                assert batch is not None
                got.append([p[1] for p in batch.points])
                buf.ack(batch)
        assert got == [[0], [1], [2]]
        assert f"moving the inbox of {path} failed: database or disk is full" in [
            r.getMessage() for r in caplog.records]
        monkeypatch.undo()
        assert len(buf) == 2
    finally:
        buf.close()


def test_delivered_blocks_that_cannot_be_deleted_are_skipped_then_deleted(tmp_path,
                                                                         monkeypatch, caplog):
    import logging

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(1)
        buf.put_many(pts(0, 4))
        buf.sync()
        ids = [i for i, _ in blocks(path)]
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "DELETE FROM blocks"))
        got = []
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                batch = buf.take(1)
                assert batch is not None
                got.append([p[1] for p in batch.points])
                buf.ack(batch)  # delivered, but not deleted
        assert got == [[0], [1], [2]]  # each delivered block skipped from then on
        warned = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
        assert warned == [f"could not delete delivered points from {path} (disk I/O error); "
                          "will retry"] * 3
        assert len(buf) == 1 and [i for i, _ in blocks(path)] == ids
        with pytest.raises(sqlite3.OperationalError, match="^disk I/O error$"):
            buf.sync()  # the retried deletes fail too, rolled back
        monkeypatch.undo()
        buf.put_many(pts(4, 5))
        buf.sync()  # the deletes are retried
        assert [c for _, c in blocks(path)] == [1, 1]
        assert [i for i, _ in blocks(path)][0] == ids[3]
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [3, 4]
        buf.ack(batch)
        assert len(buf) == 0 and blocks(path) == []
    finally:
        buf.close()


def test_sync_fsyncs_the_inbox_only_after_new_records(tmp_path, monkeypatch):
    fsyncs: list[int] = []
    real = inbox.Segment.fsync

    def counted(seg: inbox.Segment) -> None:
        fsyncs.append(seg.gen)
        real(seg)

    monkeypatch.setattr(inbox.Segment, "fsync", counted)
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        buf.put(pts(0, 1)[0])  # the first record opens the segment
        buf.sync()
        assert len(fsyncs) == 1
        buf.sync()  # nothing new: nothing to make durable
        assert len(fsyncs) == 1
        buf.put(pts(1, 2)[0])  # appended in place
        buf.sync()
        assert len(fsyncs) == 2
        buf.put_many(pts(2, 4))  # appended in place too
        buf.sync()
        assert len(fsyncs) == 3
        assert len(set(fsyncs)) == 1  # all in one segment
        assert len(buf) == 4
    finally:
        buf.close()


def test_a_new_codec_starts_a_new_segment_and_the_same_one_does_not(tmp_path):
    from plexus.codec import POINTS, IngestCodec

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 2))
        gens = inbox.segment_gens(path)
        assert len(gens) == 1
        buf.set_codec(POINTS)  # the same tag: the segment goes on
        buf.put_many(pts(2, 3))
        assert inbox.segment_gens(path) == gens
        ingest = IngestCodec("s1")
        buf.set_codec(ingest)  # a segment's records all share one codec
        buf.put_many(pts(3, 5))
        newest = inbox.segment_gens(path)[-1]
        assert newest > gens[-1]
        seg = inbox.read_segment(inbox.segment_path(path, newest), newest)
        assert seg.codec_tag == "ingest:s1"
        assert seg.records == [ingest.record(p) for p in pts(3, 5)]
        old = inbox.read_segment(inbox.segment_path(path, gens[0]), gens[0])
        assert old.sealed and old.codec_tag == "points"  # the old one is sealed
        assert len(buf) == 5
    finally:
        buf.close()


def test_a_spare_segment_of_another_codec_is_replaced(tmp_path, monkeypatch):
    from plexus.codec import IngestCodec

    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        many = pts(0, 3000)
        assert sum(len(buf.codec.record(p)) + inbox.HEADER_SIZE for p in many) > \
            inbox.MIN_SEGMENT_BYTES // 2
        buf.put_many(many[:1])
        buf.put_many(many[1:])  # past half the segment
        buf.sync()  # makes the spare, for points
        (first,) = [g for g in inbox.segment_gens(path) if g < buf._gen - 1]
        spare = buf._gen - 1
        assert inbox.segment_gens(path) == [first, spare]
        ingest = IngestCodec("s1")
        buf.set_codec(ingest)  # the spare is for another codec: a new one is made
        buf.put_many(pts(3000, 3002))
        assert not inbox.segment_path(path, spare).exists()
        newest = inbox.segment_gens(path)[-1]
        seg = inbox.read_segment(inbox.segment_path(path, newest), newest)
        assert seg.codec_tag == "ingest:s1"
        assert seg.records == [ingest.record(p) for p in pts(3000, 3002)]
        assert len(buf) == 3002
    finally:
        buf.close()


def test_a_batch_whose_record_in_flight_fails_is_still_sent(tmp_path, monkeypatch, caplog):
    import logging

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))
        buf.sync()
        monkeypatch.setattr(buf, "_conn", Refusing(
            buf._conn, "INSERT OR REPLACE INTO meta VALUES ('in_flight'"))
        with caplog.at_level(logging.DEBUG, logger="plexus.buffer"):
            batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2]
        assert "recording the batch in flight failed: disk I/O error" in [
            r.getMessage() for r in caplog.records]
        monkeypatch.undo()
        buf.ack(batch)
        assert len(buf) == 0 and blocks(path) == []
    finally:
        buf.close()


def test_points_kept_in_memory_are_dropped_only_past_the_limit(tmp_path, monkeypatch, caplog):
    import logging

    from plexus import sqlite_buffer

    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        _disk_full(monkeypatch)
        monkeypatch.setattr(sqlite_buffer, "_SPILL_MAX_POINTS", 5)
        with caplog.at_level(logging.WARNING):
            buf.put_many(pts(0, 5))  # exactly the limit: all kept
            assert (buf.spilled, buf.dropped, len(buf)) == (5, 0, 5)
            assert not [m for m in caplog.messages if "dropping the oldest" in m]
            buf.put_many(pts(5, 6))  # one past it: the oldest goes
            assert (buf.spilled, buf.dropped, len(buf)) == (6, 1, 5)
            assert len([m for m in caplog.messages if "dropping the oldest" in m]) == 1
            monkeypatch.undo()
            buf.sync()  # the disk has room again: the sync thread makes a segment
            buf.put_many(pts(6, 7))
            assert (f"the buffer {buf.path} is writable again: points go to disk"
                    in caplog.messages)
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [1, 2, 3, 4, 5, 6]
        buf.ack(batch)
    finally:
        buf.close()


def test_stats_take_the_stamps_of_the_first_and_last_record_of_the_inbox(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many([("seq", i, T0 + ts, None) for i, ts in enumerate([5, 1, 9, 3])])
        stats = buffer_stats(path)  # all in the inbox: its first and last records
        assert (stats["points"], stats["oldest_ms"], stats["newest_ms"]) == (4, T0 + 3, T0 + 5)
    finally:
        buf.close()


@pytest.mark.parametrize(("cap_records", "counts"), [(4, [2, 3, 2, 2]), (1, [1] * 9)])
def test_blocks_of_big_records_are_halved_below_the_raw_block_size(tmp_path, monkeypatch,
                                                                   cap_records, counts):
    from plexus import sqlite_buffer

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.set_block_limit(9)
        (size,) = {len(buf.codec.record(p)) for p in pts(0, 9)}
        monkeypatch.setattr(sqlite_buffer, "BLOCK_RAW_BYTES", cap_records * size)
        buf.put_many(pts(0, 9))
        buf.sync()
        assert [c for _, c in blocks(path)] == counts
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == list(range(9))
        buf.ack(batch)
    finally:
        buf.close()


def test_stats_count_the_records_of_every_segment_a_crash_left(tmp_path):
    from plexus.codec import POINTS

    path = tmp_path / "b.db"
    SqliteBuffer(path, sync_interval=3600).close()
    conn = sqlite3.connect(path)
    try:
        (gen,) = conn.execute("SELECT value FROM meta WHERE key = 'inbox_gen'").fetchone()
        gen = int(gen)
        # Segment gen is in SQLite already (the position is past it), not yet deleted.
        conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_gen'", (str(gen + 1),))
        conn.commit()
    finally:
        conn.close()
    ends = []
    # As a crash leaves them: the moved one, one that cannot be read (a folder in
    # its place), then two not moved yet, sealed and still being written.
    for g, (start, stop) in [(gen, (0, 4)), (gen + 2, (10, 13)), (gen + 3, (13, 15))]:
        seg = inbox.Segment(path, g, POINTS.tag)
        for p in pts(start, stop):
            framed = inbox.frame(POINTS.record(p))
            seg.map[seg.pos:seg.pos + len(framed)] = framed
            seg.pos += len(framed)
        if g != gen + 3:
            seg.seal()
        ends.append(seg.pos)
        seg.close()
    inbox.segment_path(path, gen + 1).mkdir()
    stats = buffer_stats(path)
    assert (stats["points"], stats["oldest_ms"], stats["newest_ms"]) == (5, T0 + 10, T0 + 14)
    assert stats["bytes"] == path.stat().st_size + sum(ends)


def test_stats_of_blocks_without_a_meta_table(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 4))
    buf.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE meta")  # a file cut down by hand: no recorded position
    conn.commit()
    conn.close()
    stats = buffer_stats(path)
    assert (stats["points"], stats["oldest_ms"], stats["newest_ms"], stats["losses"]) == \
        (4, T0, T0 + 3, {})


def test_every_wait_for_room_is_counted(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", max_points=4, sync_interval=3600)
    buf.set_consumer_running(True)
    try:
        buf.put_many(pts(0, 4))
        for start in (4, 6):
            producer = threading.Thread(target=buf.put_many, args=(pts(start, start + 2),))
            producer.start()
            producer.join(0.3)
            assert producer.is_alive()  # no room: it waits
            batch = buf.take(2)
            assert batch is not None
            buf.ack(batch)
            producer.join(10)
            assert not producer.is_alive()
        assert buf.waited == 2
    finally:
        buf.set_consumer_running(False)
        buf.close()


def test_stored_bytes_add_up_over_several_moves(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        for start in (0, 10, 20):
            buf.put_many(pts(start, start + 10))
            buf.sync()
        assert len(blocks(path)) == 3
        assert buf.stored_bytes == stored_block_bytes(path)
    finally:
        buf.close()


def test_an_old_inbox_is_read_from_the_recorded_offset(tmp_path):
    path = tmp_path / "b.db"
    moved = _old_records(range(2))  # already in SQLite before the upgrade
    _old_buffer(path, rows=2, inboxes={3: moved + _old_records(range(2, 5))})
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_offset'", (str(len(moved)),))
    conn.commit()
    conn.close()
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2, 3, 4]
    finally:
        buf.close()


def test_the_new_schema_is_recorded_and_the_count_of_every_segment_logged(tmp_path, caplog):
    path = tmp_path / "b.db"
    _old_buffer(path, rows=0, inboxes={3: _old_records(range(2)), 4: _old_records(range(2, 5))})
    caplog.set_level("INFO", logger="plexus.buffer")
    SqliteBuffer(path, sync_interval=3600).close()
    assert f"recovered 5 points from the inbox of {path}" in caplog.messages
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
    finally:
        conn.close()
    caplog.clear()
    buf = SqliteBuffer(path, sync_interval=3600)  # nothing to convert a second time
    try:
        assert len(buf) == 5
    finally:
        buf.close()
    assert not [m for m in caplog.messages if "converted" in m or "recovered" in m]


def test_the_write_ahead_log_is_private_even_beside_a_readable_database(tmp_path):
    path = tmp_path / "b.db"
    SqliteBuffer(path, sync_interval=3600).close()
    os.chmod(path, 0o644)  # copied by hand, or left by an older version
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put(("seq", 1, T0, None))
        buf.sync()
        for suffix in ("-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600, suffix
    finally:
        buf.close()
