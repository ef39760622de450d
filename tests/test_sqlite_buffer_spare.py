"""The spare inbox segment of the persistent buffer: made once the current segment
is past half full (not at half), and thrown away when the lane's codec changed
while it was being made. In-process, real files, a sync interval of an hour:
only the test's own ``sync()`` calls make a spare."""

from __future__ import annotations

import pytest

from plexus import inbox
from plexus.codec import IngestCodec
from plexus.sqlite_buffer import SqliteBuffer

T0 = 1700000000000


def padded(width: int) -> tuple[str, str, int, None]:
    return ("pad", "x" * width, T0, None)


def framed_size(buf: SqliteBuffer, point: tuple) -> int:
    return len(buf.codec.record(point)) + inbox.HEADER_SIZE


@pytest.fixture
def small_segments(monkeypatch):
    monkeypatch.setattr(inbox, "SEGMENT_BYTES", inbox.MIN_SEGMENT_BYTES)


def test_the_spare_is_made_past_half_the_segment_not_at_half(tmp_path, small_segments):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    try:
        buf.put(padded(0))
        seg = buf._segment
        half = seg.size // 2
        widest = framed_size(buf, padded(100))
        while half - seg.pos > widest:
            buf.put(padded(40))
        gap = half - seg.pos
        (width,) = [w for w in range(101) if framed_size(buf, padded(w)) == gap][:1]
        buf.put(padded(width))
        assert seg.pos == half
        buf.sync()
        assert len(inbox.segment_gens(path)) == 1 and buf._spare is None  # at half: not yet
        buf.put(padded(0))
        buf.sync()
        assert len(inbox.segment_gens(path)) == 2 and buf._spare is not None
    finally:
        buf.close()


def test_a_spare_made_while_the_codec_changed_is_thrown_away(tmp_path, small_segments,
                                                            monkeypatch):
    path = tmp_path / "b.db"
    buf = SqliteBuffer(path, sync_interval=3600)
    ingest = IngestCodec("s1")
    made: list[int] = []
    real_segment = inbox.Segment

    def segment_meanwhile_switched(db, gen, tag, *args):
        made.append(gen)
        if len(made) == 1:  # the spare: the lane's codec changes while it is made
            buf.set_codec(ingest)
        return real_segment(db, gen, tag, *args)

    try:
        while buf._segment is None or buf._segment.pos <= buf._segment.size // 2:
            buf.put(padded(40))
        before = buf._segment.gen
        monkeypatch.setattr(inbox, "Segment", segment_meanwhile_switched)
        buf.sync()
        spare_gen = made[0]
        assert not inbox.segment_path(path, spare_gen).exists()  # a points spare: removed
        assert buf._spare is None
        assert buf._segment.gen != before and buf._segment.codec_tag == "ingest:s1"
        monkeypatch.setattr(inbox, "Segment", real_segment)
        buf.put(padded(1))
        count = len(buf)
    finally:
        buf.close()
    again = SqliteBuffer(path, sync_interval=3600)
    try:
        assert len(again) == count
    finally:
        again.close()
