"""Opening a persistent buffer: its arguments, the files and thread it makes, and
what it recovers from the files a crash left, with the exact log lines an operator
reads. Each test drives a real SqliteBuffer in-process (so a mutation run reaches
it). A crash is simulated as the existing tests do: the files of a live buffer are
copied elsewhere (what the disk holds when the process dies) and opened there."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import threading
from pathlib import Path

import pytest

from plexus import inbox
from plexus.codec import POINTS, IngestCodec
from plexus.sqlite_buffer import SqliteBuffer

T0 = 1700000000000
LOGGER = "plexus.buffer"  # the persistent buffer logs as the buffer does


def pts(start: int, stop: int) -> list[tuple[str, int, int, None]]:
    return [("seq", i, T0 + i, None) for i in range(start, stop)]


def drain(buf: SqliteBuffer) -> list[int]:
    values = []
    while (batch := buf.take(1000)) is not None:
        values += [p[1] for p in batch.points]
        buf.ack(batch)
    return values


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def crash_image(path: Path, where: Path) -> Path:
    """The files of the live buffer at ``path`` as a crash leaves them, in ``where``."""
    where.mkdir()
    for f in path.parent.iterdir():
        if f.name.startswith(path.name) and not f.name.endswith(".lock"):
            shutil.copy(f, where / f.name)
    return where / path.name


def segment(records: range, sealed: bool, tail: bytes = b"") -> bytes:
    """An inbox segment as the writer leaves it: header, records, seal, then ``tail``."""
    body = b"".join(inbox.frame(POINTS.record(p)) for p in pts(records.start, records.stop))
    return inbox.header(POINTS.tag) + body + (inbox.frame(inbox.SEAL) if sealed else b"") + tail


# --- arguments, files, thread ----------------------------------------------------------------


def test_the_default_sync_interval_is_one_second_and_max_bytes_starts_at_1(tmp_path):
    buf = SqliteBuffer(tmp_path / "a.db", max_bytes=1)
    try:
        assert buf.sync_interval == 1.0 and buf.max_bytes == 1
    finally:
        buf.close()
    with pytest.raises(ValueError, match=r"^max_bytes must be at least 1$"):
        SqliteBuffer(tmp_path / "b.db", max_bytes=0)


def test_when_full_is_passed_on(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", when_full="drop_oldest")
    try:
        assert buf.when_full == "drop_oldest"
    finally:
        buf.close()


def test_a_cap_of_4_points_stores_blocks_of_one_point(tmp_path):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, max_points=4, sync_interval=3600)
    try:
        assert buf.block_points == 1
        buf.put_many(pts(0, 3))
        buf.sync()
        batch = buf.take(1)
        assert batch is not None and [p[1] for p in batch.points] == [0]
        buf.ack(batch)
        assert drain(buf) == [1, 2]
    finally:
        buf.close()


def test_the_sync_thread_is_a_named_daemon_that_close_stops(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db")
    try:
        (thread,) = [t for t in threading.enumerate() if t.name == "plexus-buffer-sync:b.db"]
        assert thread.daemon  # never keeps a process alive that forgot to close
    finally:
        buf.close()
    assert not thread.is_alive()


def test_missing_folders_are_made_and_the_files_are_private(tmp_path):
    path = tmp_path / "a" / "b" / "buffer.db"
    buf = SqliteBuffer(path)
    buf.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The WAL and its index exist while a buffer is open, and hold points too.
    buf = SqliteBuffer(path)
    try:
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            assert stat.S_IMODE(side.stat().st_mode) == 0o600, suffix
    finally:
        buf.close()


def test_a_failed_recovery_raises_its_error_and_frees_the_file(tmp_path, monkeypatch):
    path = tmp_path / "b.db"

    def fails(self: SqliteBuffer) -> int:
        raise RuntimeError("recovery failed")

    monkeypatch.setattr(SqliteBuffer, "_recover", fails)
    with pytest.raises(RuntimeError, match="recovery failed"):
        SqliteBuffer(path)
    monkeypatch.undo()
    buf = SqliteBuffer(path)  # the lock was let go: the next open owns the file
    buf.close()


# --- recovery after a crash ------------------------------------------------------------------


def test_points_a_crash_left_in_the_inbox_are_recovered_and_logged_once(tmp_path, caplog):
    live = tmp_path / "live" / "b.db"
    buf = SqliteBuffer(live, sync_interval=3600)
    try:
        buf.put_many(pts(0, 30))
        path = crash_image(live, tmp_path / "crashed")
    finally:
        buf.close()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert [m for m in messages(caplog) if "recovered" in m] == [
            f"recovered 30 points from the inbox of {path}"]
        assert drain(again) == list(range(30))
        assert inbox.segment_gens(path) == [] and again.torn_records == 0  # files removed
    finally:
        again.close()


def test_a_crash_after_a_move_recovers_only_the_records_not_moved(tmp_path):
    live = tmp_path / "live" / "b.db"
    buf = SqliteBuffer(live, sync_interval=3600)
    try:
        buf.put_many(pts(0, 10))
        buf.sync()  # 0..9 in SQLite, the position in the segment recorded
        buf.put_many(pts(10, 15))  # in the same segment, past that position
        path = crash_image(live, tmp_path / "crashed")
    finally:
        buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert drain(again) == list(range(15))  # none twice, none lost
    finally:
        again.close()


def test_a_crash_right_after_a_recovery_loses_nothing(tmp_path):
    # The first crash leaves points in the inbox; the next run recovers them, writes
    # more into a new segment and crashes too: its recovery must find them all.
    live = tmp_path / "live" / "b.db"
    buf = SqliteBuffer(live, sync_interval=3600)
    try:
        buf.put_many(pts(0, 5))
        first = crash_image(live, tmp_path / "first")
    finally:
        buf.close()
    buf = SqliteBuffer(first, sync_interval=3600)
    try:
        buf.put_many(pts(5, 12))
        second = crash_image(first, tmp_path / "second")
    finally:
        buf.close()
    again = SqliteBuffer(second, sync_interval=3600)
    try:
        assert drain(again) == list(range(12))
    finally:
        again.close()


def test_a_crash_during_recovery_recovers_each_segment_once(tmp_path, monkeypatch):
    path = tmp_path / "b.db"
    SqliteBuffer(path).close()  # a file with nothing in it
    inbox.segment_path(path, 7).write_bytes(segment(range(0, 4), sealed=True))
    inbox.segment_path(path, 8).write_bytes(segment(range(4, 9), sealed=True))
    inbox.segment_path(path, 9).write_bytes(segment(range(9, 12), sealed=False))
    real = inbox.read_segment

    class PowerCut(BaseException):
        pass

    def cut_at_9(p: Path, gen: int, start: int = 0) -> inbox.ReadSegment:
        if gen == 9:  # segments 7 and 8 are in SQLite, their files not deleted yet
            raise PowerCut
        return real(p, gen, start)

    monkeypatch.setattr(inbox, "read_segment", cut_at_9)
    with pytest.raises(PowerCut):
        SqliteBuffer(path, sync_interval=3600)
    monkeypatch.undo()
    assert inbox.segment_gens(path) == [7, 8, 9]
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert drain(again) == list(range(12))
        assert again.lost == {}
    finally:
        again.close()


def test_segments_already_in_sqlite_are_skipped_and_the_later_ones_read(tmp_path):
    live = tmp_path / "live" / "b.db"
    buf = SqliteBuffer(live, sync_interval=3600)
    try:
        buf.put_many(pts(0, 3))
        buf.sync()
        (gen,) = inbox.segment_gens(live)
        buf.set_codec(IngestCodec("s1"))  # a new segment, the moved one still on disk
        buf.put_many(pts(3, 6))
        path = crash_image(live, tmp_path / "crashed")
    finally:
        buf.close()
    gens = inbox.segment_gens(path)
    assert gens[0] == gen and len(gens) == 2
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        # The segment of the other codec is read with that codec (a batch holds one
        # codec), and nothing of the moved segment comes twice.
        counts = []
        while (batch := again.take(1000)) is not None:
            counts.append((batch.count, batch.codec_tag))
            again.ack(batch)
        assert counts == [(3, "points"), (3, "ingest:s1")]
    finally:
        again.close()


def test_torn_tails_are_counted_per_segment_with_one_warning_each(tmp_path, caplog):
    path = tmp_path / "b.db"
    SqliteBuffer(path).close()
    garbage = b"\x13\x37" * 5 + bytes(100)  # 10 bytes that are not a record, then zeros
    inbox.segment_path(path, 3).write_bytes(segment(range(0, 2), sealed=True, tail=garbage))
    inbox.segment_path(path, 4).write_bytes(segment(range(2, 5), sealed=False, tail=garbage))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert buf.torn_records == 2
        assert messages(caplog) == [
            f"{inbox.segment_path(path, gen)}: 10 bytes after the last whole record are not "
            "records (a write cut by a crash or power cut, or data the disk never received) "
            "and were discarded" for gen in (3, 4)]
        assert drain(buf) == list(range(5))
    finally:
        buf.close()


def test_every_segment_after_a_gap_is_discarded_and_counted(tmp_path, caplog):
    path = tmp_path / "b.db"
    SqliteBuffer(path).close()
    inbox.segment_path(path, 3).write_bytes(segment(range(0, 2), sealed=False))  # cut short
    inbox.segment_path(path, 4).write_bytes(segment(range(2, 5), sealed=True))
    inbox.segment_path(path, 5).write_bytes(segment(range(5, 9), sealed=False))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf = SqliteBuffer(path, sync_interval=3600)
    try:
        assert buf.lost == {"after a gap": 7}
        assert messages(caplog) == [
            f"{inbox.segment_path(path, gen)}: {n} records follow a segment a power cut cut "
            "short; they were discarded so that what is kept stays in order"
            for gen, n in ((4, 3), (5, 4))]
        assert drain(buf) == [0, 1]
    finally:
        buf.close()


def test_an_unreadable_segment_is_moved_aside_with_a_warning(tmp_path, monkeypatch, caplog):
    path = tmp_path / "b.db"
    SqliteBuffer(path).close()
    inbox.segment_path(path, 3).write_bytes(segment(range(0, 2), sealed=False))
    real = inbox.read_segment

    def broken(p: Path, gen: int, start: int = 0) -> inbox.ReadSegment:
        if gen == 3:
            raise OSError(5, "Input/output error")
        return real(p, gen, start)

    monkeypatch.setattr(inbox, "read_segment", broken)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        buf = SqliteBuffer(path, sync_interval=3600)
    buf.close()
    (aside,) = [f for f in path.parent.iterdir() if ".unreadable-" in f.name]
    seg = inbox.segment_path(path, 3)
    assert re.fullmatch(re.escape(seg.name) + r"\.unreadable-\d{8}T\d{6}", aside.name)
    assert messages(caplog) == [
        f"buffer inbox {seg} cannot be read ([Errno 5] Input/output error); moved it aside "
        f"to {aside}"]
    assert os.path.getsize(aside) > 0
