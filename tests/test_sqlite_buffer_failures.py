"""The persistent buffer when something refuses: a file another client holds, a file
that is not a buffer, a disk that refuses a statement in the middle of a
transaction, blocks that cannot be set aside twice in a row, a recorded batch that
no longer adds up. Each test drives a real SqliteBuffer in-process (so a mutation
run reaches it) and checks the exact error or log line an operator reads."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from plexus.errors import BufferingError
from plexus.sqlite_buffer import SqliteBuffer
from tests.support import Refusing

T0 = 1700000000000
LOGGER = "plexus.buffer"


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def block_ids(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [i for (i,) in conn.execute("SELECT id FROM blocks ORDER BY id")]
    finally:
        conn.close()


def test_a_file_another_client_holds_is_refused_by_name(tmp_path):
    path = tmp_path / "b.db"
    first = SqliteBuffer(path, sync_interval=3600)
    try:
        lock = Path(f"{path}.lock")
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        with pytest.raises(BufferingError) as info:
            SqliteBuffer(path, sync_interval=3600)
        assert str(info.value) == (
            f"the buffer {path} is in use by another process; give each client its own "
            "buffer_path (or source_id)")
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        first.close()
    SqliteBuffer(path, sync_interval=3600).close()  # the lock went with the first one


def test_a_file_that_is_not_a_buffer_is_moved_aside_with_a_warning(tmp_path, monkeypatch,
                                                                   caplog):
    import time

    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "STAMP" if fmt == "%Y%m%dT%H%M%S"
                        else real(fmt, *a))
    path = tmp_path / "b.db"
    path.write_bytes(b"not a database at all" * 100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 2))
        assert len(buf) == 2
    finally:
        buf.close()
    aside = tmp_path / "b.db.corrupt-STAMP"
    assert aside.read_bytes() == b"not a database at all" * 100
    assert messages(caplog) == [
        f"buffer file {path} could not be used (file is not a database); moved it aside "
        f"to {aside} and started a fresh buffer"]


def test_loss_counts_that_cannot_be_stored_are_kept_and_stored_later(tmp_path, monkeypatch,
                                                                   caplog):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.count_rejected(3)
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "INSERT INTO counters"))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            buf.sync()  # the counts' own transaction fails: logged, not raised
        assert messages(caplog) == [f"could not store the loss counts of {path}: disk I/O error"]
        assert not buf._conn.in_transaction  # rolled back
        monkeypatch.undo()
        buf.sync()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT name, value FROM counters").fetchall() == [("rejected", 3)]
        finally:
            conn.close()
        buf.sync()  # nothing new: stored once
    finally:
        buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert again.loss_counts() == {"buffer_full": 0, "rejected": 3}
    finally:
        again.close()


def test_a_refused_insert_is_rolled_back_and_its_error_raised(tmp_path, monkeypatch):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "INSERT INTO blocks"))
        with pytest.raises(sqlite3.OperationalError, match="^disk I/O error$"):
            buf.sync()
        assert not buf._conn.in_transaction
        monkeypatch.undo()
        assert len(buf) == 3 and block_ids(path) == []  # the records wait in memory
        buf.sync()
        batch = buf.take(100)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1, 2]
        buf.ack(batch)
    finally:
        buf.close()


def _damaged(path: Path, blocks_of_two: int, damaged: list[int]) -> list[int]:
    """A closed buffer of ``blocks_of_two`` blocks of two points, those at the
    positions ``damaged`` failing their CRC; returns the blocks' ids."""
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.set_block_limit(2)
    buf.put_many(pts(0, 2 * blocks_of_two))
    buf.close()
    ids = block_ids(path)
    conn = sqlite3.connect(path)
    conn.executemany("UPDATE blocks SET crc = crc + 1 WHERE id = ?", [(ids[n],) for n in damaged])
    conn.commit()
    conn.close()
    return ids


def test_damaged_blocks_that_cannot_be_set_aside_are_all_skipped(tmp_path, monkeypatch,
                                                                caplog):
    path = tmp_path / "b.db"
    ids = _damaged(path, 3, [0, 1])
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "INSERT OR REPLACE INTO set_aside"))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            batch = buf.take(2)  # one block a batch: each damaged one fails on its own
        assert batch is not None and [p[1] for p in batch.points] == [4, 5]
        assert buf.lost == {"unreadable": 4}  # each counted once
        assert [m for m in messages(caplog) if m.startswith("could not set aside")] == \
            [f"could not set aside unreadable blocks of {path}: disk I/O error"] * 2
        buf.ack(batch)
        monkeypatch.undo()
        assert len(buf) == 0 and buf.take(100) is None  # still skipped
        assert block_ids(path) == ids[:2]
    finally:
        buf.close()


def test_the_newest_batch_after_a_damaged_newest_block_is_the_next_newest(tmp_path):
    path = tmp_path / "b.db"
    _damaged(path, 3, [2])
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        batch = buf.take(2, newest=True)
        assert batch is not None and [p[1] for p in batch.points] == [2, 3]
        assert buf.lost == {"unreadable": 2}
    finally:
        buf.close()


def test_a_recorded_batch_that_no_longer_adds_up_is_chosen_afresh(tmp_path):
    path = tmp_path / "b.db"
    ids = _damaged(path, 3, [])
    conn = sqlite3.connect(path)
    # The record names the blocks from the first to the last, but not their count:
    # a different batch now, which gets a new key and respects the limit.
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('in_flight', ?)", (f"{ids[0]}-{ids[2]}-7",))
    conn.commit()
    conn.close()
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        batch = buf.take(2)
        assert batch is not None and [p[1] for p in batch.points] == [0, 1]
        assert batch.key.endswith(f"-{ids[0]}-{ids[0]}-2")
    finally:
        buf.close()


def test_a_segment_file_removed_before_a_codec_switch_does_not_stop_the_producer(
        tmp_path, monkeypatch):
    from plexus import inbox
    from plexus.codec import IngestCodec

    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put_many(pts(0, 1))
        buf.put_many(pts(1, 3000))  # past half the segment
        buf.sync()  # makes the spare, for points
        spare = inbox.segment_path(path, buf._gen - 1)
        os.unlink(spare)  # an operator cleaning up, say
        buf.set_codec(IngestCodec("s1"))
        buf.put_many(pts(3000, 3002))
        assert len(buf) == 3002
    finally:
        buf.close()


def _something_else(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE readings (x)")
    conn.commit()
    conn.close()
    return "a database of something else (tables ['meta', 'readings'])"


def _unknown_schema(path: Path) -> str:
    SqliteBuffer(path, sync_interval=3600).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    return "unexpected schema '9'"


def _other_columns(path: Path) -> str:
    SqliteBuffer(path, sync_interval=3600).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE blocks")
    conn.execute("CREATE TABLE blocks (id INTEGER PRIMARY KEY, data BLOB)")
    conn.commit()
    conn.close()
    return "unexpected columns ['id', 'data']"


def _damaged_pages(path: Path) -> str:
    """A file whose structure fails SQLite's quick_check: a page of the blocks
    table claims cells it does not have (the first such page, whatever SQLite's
    layout)."""
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.set_block_limit(1)
    buf.put_many(pts(0, 300))
    buf.close()
    original = path.read_bytes()
    for page in range(2, len(original) // 4096):
        data = bytearray(original)
        data[page * 4096 + 3:page * 4096 + 5] = b"\x00\x7f"  # the page's count of cells
        path.write_bytes(bytes(data))
        conn = sqlite3.connect(path)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError:
            continue
        finally:
            conn.close()
        if check != "ok":
            return f"integrity check failed: {check}"
    raise AssertionError("no page of the blocks table could be damaged")


@pytest.mark.parametrize("make", [_something_else, _unknown_schema, _other_columns,
                                  _damaged_pages])
def test_each_kind_of_unusable_file_is_named_in_the_warning(tmp_path, monkeypatch, caplog,
                                                            make):
    import time

    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "STAMP" if fmt == "%Y%m%dT%H%M%S"
                        else real(fmt, *a))
    path = tmp_path / "b.db"
    why = make(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        SqliteBuffer(path, sync_interval=3600).close()
    assert messages(caplog) == [
        f"buffer file {path} could not be used ({why}); moved it aside to "
        f"{tmp_path / 'b.db.corrupt-STAMP'} and started a fresh buffer"]


def test_a_file_without_read_and_write_permission_is_moved_aside(tmp_path, monkeypatch,
                                                                 caplog):
    path = tmp_path / "b.db"
    SqliteBuffer(path, sync_interval=3600).close()
    # Root passes every permission check, so os.access answers as for a file we may
    # read but not write.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not (mode & os.W_OK) and real(p, mode)
                        if Path(p) == path else real(p, mode))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        SqliteBuffer(path, sync_interval=3600).close()
    (message,) = messages(caplog)
    assert message.startswith(f"buffer file {path} could not be used (no read/write "
                              f"permission on {path}); moved it aside to ")


def test_a_failing_disk_is_logged_once_every_30_seconds(tmp_path, monkeypatch, caplog):
    import types

    from plexus import ratelimit

    now = [1000.0]
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        monkeypatch.setattr(buf, "_conn", Refusing(buf._conn, "INSERT INTO blocks"))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for at in (0.0, 29.9, 30.0):
                now[0] = 1000.0 + at
                buf.put_many(pts(0, 2))
                batch = buf.take(100)  # the move fails: sent from memory
                assert batch is not None and batch.count == 2
                buf.ack(batch)
        failed = f"moving the inbox of {path} failed: disk I/O error"
        assert messages(caplog) == [failed, failed + " (1 similar messages suppressed)"]
    finally:
        monkeypatch.undo()
        buf.close()
