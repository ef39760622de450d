"""Closing the persistent buffer: the final sync and checkpoint, and what happens
to the inbox when either fails, when the disk is full, when a segment file is
already gone, and when close() is called twice. Each test drives a real
SqliteBuffer in-process and checks the exact log line an operator reads."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from plexus import inbox
from plexus.sqlite_buffer import SqliteBuffer
from tests.support import Refusing, refuse_moves
from tests.test_sqlite_buffer import _disk_full

T0 = 1700000000000
LOGGER = "plexus.buffer"


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


def segment_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(inbox.segment_path(path, 0).name.replace("0", "*")))


def drain(path: Path) -> list[int]:
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        batch = buf.take(1000)
        return [] if batch is None else [p[1] for p in batch.points]
    finally:
        buf.close()


def test_a_clean_close_leaves_no_inbox_file_and_an_empty_wal(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 3))
    assert segment_files(path)
    buf.close()
    assert segment_files(path) == []
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and truncated
    assert drain(path) == [0, 1, 2]


def test_a_failed_final_sync_is_logged_and_the_inbox_kept_for_the_next_open(
        tmp_path, monkeypatch, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 3))

    def broken_fsync(self: inbox.Segment) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(inbox.Segment, "fsync", broken_fsync)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf.close()
    assert warnings(caplog) == [
        f"final sync of {path} failed: [Errno 5] Input/output error"]
    assert segment_files(path)  # the only copy of the three points
    monkeypatch.undo()
    assert drain(path) == [0, 1, 2]


def test_a_failed_final_checkpoint_is_logged_and_nothing_is_lost(tmp_path, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 3))
    buf._conn = Refusing(buf._conn, "PRAGMA wal_checkpoint(TRUNCATE)",  # type: ignore[assignment]
                         "database is locked")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf.close()
    assert warnings(caplog) == [f"final checkpoint of {path} failed: database is locked"]
    assert segment_files(path)  # kept: nothing said the move reached the database file
    assert drain(path) == [0, 1, 2]  # once each: the recorded position skips them
    assert not segment_files(path)


def test_points_kept_in_memory_on_a_full_disk_are_reported_lost_at_close(
        tmp_path, monkeypatch, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    _disk_full(monkeypatch)  # no inbox segment can be made: points stay in memory
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf.put_many(pts(0, 4))
        assert buf.spilled == 4
        refuse_moves(buf)
        buf.close()
    assert warnings(caplog) == [
        f"cannot make a buffer file beside {path} ([Errno 28] No space left on device): "
        "keeping points in memory (at most 100000) until the disk has room again",
        f"final sync of {path} failed: database or disk is full",
        f"4 points could not be written to {path} (disk full) and are lost"]


def test_points_kept_in_memory_that_reach_sqlite_at_close_are_not_reported_lost(
        tmp_path, monkeypatch, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    _disk_full(monkeypatch)  # no inbox segment can be made: points stay in memory
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf.put_many(pts(0, 4))
        buf.close()
    assert warnings(caplog)[1:] == [  # the final sync tried to make the next segment
        f"cannot make the next inbox segment of {path} yet: [Errno 28] No space left on device"]
    monkeypatch.undo()
    assert drain(path) == [0, 1, 2, 3]


def test_a_segment_file_already_removed_does_not_stop_close(tmp_path, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 3))
    buf.sync()  # the points are in SQLite; the segment is only a copy now
    for seg in segment_files(path):
        seg.unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf.close()
    assert warnings(caplog) == []
    assert drain(path) == [0, 1, 2]


def test_closing_twice_does_nothing_the_second_time(tmp_path, caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 2))
    buf.close()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        buf.close()
        buf.sync()  # a no-op once closed
    assert [r for r in caplog.records if r.name == LOGGER] == []
    assert drain(path) == [0, 1]


class OlderSnapshot:
    """Another connection in a read transaction (as ``plexus-gateway buffer`` briefly is):
    a checkpoint cannot copy the frames committed after its snapshot."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT COUNT(*) FROM blocks").fetchone()

    def end(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def fill_the_segment(buf: SqliteBuffer, start: int) -> tuple[int, int]:
    """Put points until the segment written now is full and the next one starts:
    (the full segment's number, the next start)."""
    buf.put_many(pts(start, start + 1))
    gen = buf._segment.gen
    start += 1
    while buf._segment.gen == gen:
        buf.put_many(pts(start, start + 100))
        start += 100
    return gen, start


def test_moved_segments_stay_until_a_checkpoint_copies_every_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        first, n = fill_the_segment(buf, 0)
        reader = OlderSnapshot(path)
        buf.sync()  # moved, but the checkpoint stops at the reader's snapshot
        assert inbox.segment_path(path, first).exists()
        second, n = fill_the_segment(buf, n)
        buf.sync()
        assert inbox.segment_path(path, first).exists()
        assert inbox.segment_path(path, second).exists()
        reader.end()
        buf.sync()  # every frame copied: both moved segments go
        assert not inbox.segment_path(path, first).exists()
        assert not inbox.segment_path(path, second).exists()
        assert len(buf) == n
    finally:
        buf.close()


def test_closing_beside_an_older_snapshot_keeps_the_inbox_and_loses_nothing(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many(pts(0, 5))
    reader = OlderSnapshot(path)
    try:
        buf.close()  # the final checkpoint is busy: the segment stays on disk
        assert segment_files(path)
    finally:
        reader.end()
    assert drain(path) == [0, 1, 2, 3, 4]  # once each: the recorded position skips them
    assert not segment_files(path)


def test_a_moved_segment_removed_by_hand_meanwhile_does_not_fail_the_sync(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        first, n = fill_the_segment(buf, 0)
        reader = OlderSnapshot(path)
        buf.sync()
        reader.end()
        inbox.segment_path(path, first).unlink()  # an operator tidying up
        buf.sync()  # deleting it finds nothing to delete, and that is fine
        assert len(buf) == n
    finally:
        buf.close()
