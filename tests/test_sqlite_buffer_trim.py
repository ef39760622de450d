"""Trimming the persistent buffer to its caps: exactly the oldest whole blocks
beyond the byte cap, never the blocks of the batch in flight, nothing counted
lost when the delete is refused, and the cap kept by the records waiting in
memory when SQLite refuses to take them (a full disk). In-process, real files."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from plexus.sqlite_buffer import SqliteBuffer
from tests.support import Refusing, refuse_moves

T0 = 1700000000000


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def blocks(path: Path) -> list[tuple[int, int]]:
    """(id, stored bytes) of each block, oldest first."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute("SELECT id, LENGTH(data) FROM blocks ORDER BY id"))
    finally:
        conn.close()


def one_block_per_put(buf: SqliteBuffer, puts: int, points: int = 5) -> list[int]:
    """Put ``puts`` batches, each moved into a block of its own; their sizes."""
    for i in range(puts):
        buf.put_many(pts(i * points, (i + 1) * points))
        buf.sync()
    sizes = [size for _, size in blocks(buf.path)]
    assert len(sizes) == puts and buf.stored_bytes == sum(sizes)
    return sizes


def test_one_byte_over_the_cap_drops_the_oldest_block_and_no_more(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        sizes = one_block_per_put(buf, 3)
        buf.max_bytes = sum(sizes) - 1
        buf.sync()
        assert [i for i, _ in blocks(buf.path)] == [2, 3]
        assert (buf.dropped, len(buf), buf.stored_bytes) == (5, 10, sizes[1] + sizes[2])
        buf.max_bytes = sizes[2]  # exactly what the newest block holds: it stays
        buf.sync()
        assert [i for i, _ in blocks(buf.path)] == [3]
        assert (buf.dropped, len(buf), buf.stored_bytes) == (10, 5, sizes[2])
        assert buf.loss_counts()["buffer_full"] == 10
    finally:
        buf.close()


def test_several_blocks_dropped_at_once_are_counted_by_their_sum(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        sizes = one_block_per_put(buf, 4)
        buf.max_bytes = sizes[3]
        buf.sync()
        assert [i for i, _ in blocks(buf.path)] == [4]
        assert (buf.dropped, len(buf), buf.stored_bytes) == (15, 5, sizes[3])
    finally:
        buf.close()


def test_the_blocks_of_the_batch_in_flight_are_never_trimmed(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        sizes = one_block_per_put(buf, 3)
        batch = buf.take(5)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2, 3, 4]
        buf.max_bytes = sizes[0] + sizes[2]  # block 1 is on the wire: block 2 goes
        buf.sync()
        assert [i for i, _ in blocks(buf.path)] == [1, 3]
        assert buf.dropped == 5
        buf.ack(batch)
        assert [i for i, _ in blocks(buf.path)] == [3]
    finally:
        buf.close()


def test_a_refused_delete_counts_nothing_lost_until_it_succeeds(tmp_path, monkeypatch):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        sizes = one_block_per_put(buf, 2)
        buf.max_bytes = sizes[1]
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "DELETE FROM blocks",
                                                   "disk I/O error"))
        try:
            buf.sync()
        except sqlite3.OperationalError as exc:
            assert str(exc) == "disk I/O error"
        else:
            raise AssertionError("the refused delete was not raised")
        assert buf.loss_counts() == {"buffer_full": 0, "rejected": 0}
        assert (buf.dropped, len(buf), [i for i, _ in blocks(path)]) == (0, 10, [1, 2])
        monkeypatch.undo()
        buf.sync()
        assert buf.loss_counts() == {"buffer_full": 5, "rejected": 0}
        assert (buf.dropped, len(buf), [i for i, _ in blocks(path)]) == (5, 5, [2])
    finally:
        buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.loss_counts()["buffer_full"] == 5  # stored once, with the delete
    finally:
        again.close()


def test_the_cap_holds_in_memory_while_sqlite_refuses_the_move(tmp_path, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, max_points=10, sync_interval=3600)
    try:
        refuse_moves(buf)
        with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
            buf.put_many(pts(0, 15))
            batch = buf.take(100)  # the move fails; the 5 oldest records go
        assert (buf.dropped, buf.loss_counts()["buffer_full"]) == (5, 5)
        assert batch is not None and [p[1] for p in batch.points] == [5, 6]
        assert len(buf) == 10  # 2 in flight from memory, 8 waiting
        assert f"moving the inbox of {path} failed: database or disk is full" in [
            r.getMessage() for r in caplog.records]
        buf.ack(batch)
        assert len(buf) == 8 and buf.dropped == 5
        # The records are in the inbox file, replayed at the next open: closing while
        # SQLite still refuses reports no loss (dropping counted none of them as spilled).
        # The replay is that of a crash: the whole inbox, the dropped and acked too.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
            buf.close()
        assert not [r for r in caplog.records if "are lost" in r.getMessage()]
        again = SqliteBuffer(path, max_points=10, sync_interval=3600)
        assert len(again) == 15
        again.close()
    finally:
        buf.close()


def test_the_byte_cap_holds_in_memory_while_sqlite_refuses_the_move(tmp_path):
    from plexus import inbox

    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        refuse_moves(buf)
        points = pts(0, 5)
        sizes = {len(buf.codec.record(p)) + inbox.HEADER_SIZE for p in points}
        assert len(sizes) == 1
        record = sizes.pop()
        buf.max_bytes = 3 * record - 1  # room for two records, not three
        buf.put_many(points)
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [3, 4]
        assert (buf.dropped, buf.loss_counts()["buffer_full"]) == (3, 3)
    finally:
        buf.close()


def test_exactly_at_the_byte_cap_in_memory_nothing_more_goes(tmp_path):
    from plexus import inbox

    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        refuse_moves(buf)
        points = pts(0, 5)
        record = len(buf.codec.record(points[0])) + inbox.HEADER_SIZE
        buf.max_bytes = 2 * record  # room for exactly two
        buf.put_many(points)
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [3, 4]
        assert buf.dropped == 3
    finally:
        buf.close()


def test_when_the_batch_in_flight_alone_passes_the_byte_cap_memory_is_emptied(tmp_path):
    """The stored batch in flight cannot be dropped; every record waiting in memory
    goes, and no more (there is nothing more to drop)."""
    import pytest

    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 5))
        buf.sync()
        batch = buf.take(100)
        assert batch is not None and batch.count == 5
        refuse_moves(buf)
        buf.put_many(pts(5, 8))
        buf.max_bytes = 1
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            buf.sync()
        assert (buf.dropped, len(buf)) == (3, 5)
    finally:
        buf.close()


def refuse_the_move_once_a_producer_put(buf: SqliteBuffer, point: tuple) -> None:
    """The next move fails with a full disk after a producer put ``point`` meanwhile
    (the move holds no producer lock while it writes)."""
    def insert_blocks(*args: object) -> None:
        del buf._insert_blocks  # once: the next move is the real one
        buf.put(point)
        raise sqlite3.OperationalError("database or disk is full")

    buf._insert_blocks = insert_blocks  # type: ignore[method-assign]


def test_a_refused_move_keeps_the_bytes_of_points_put_meanwhile(tmp_path):
    from plexus import inbox

    buf = SqliteBuffer(tmp_path / "b.db", sync_interval=3600)
    try:
        buf.put_many(pts(0, 5))
        refuse_the_move_once_a_producer_put(buf, pts(5, 6)[0])
        try:
            buf.sync()
        except sqlite3.OperationalError:
            pass
        record = len(buf.codec.record(pts(0, 1)[0])) + inbox.HEADER_SIZE
        refuse_moves(buf)
        buf.max_bytes = 5 * record  # six are held: one too many
        batch = buf.take(100)
        assert buf.dropped == 1
        assert batch is not None and [p[1] for p in batch.points] == [1, 2, 3, 4, 5]
    finally:
        buf.close()


def test_a_refused_move_keeps_the_count_of_points_spilled_meanwhile(tmp_path, monkeypatch,
                                                                    caplog):
    from tests.test_sqlite_buffer import _disk_full

    _disk_full(monkeypatch)  # every point is kept in memory only
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 5))
        refuse_the_move_once_a_producer_put(buf, pts(5, 6)[0])
        try:
            buf.sync()
        except sqlite3.OperationalError:
            pass
        refuse_moves(buf)
        with caplog.at_level(logging.WARNING, logger="plexus.buffer"):
            buf.close()
        assert f"6 points could not be written to {path} (disk full) and are lost" in \
            caplog.messages
    finally:
        buf.close()
