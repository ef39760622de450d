"""The persistent buffer's inbox format: records, segments, and reading them back.

Written from the mutation run of plexus/inbox.py: each test pins what a
record or a segment must look like and what a reader must refuse.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import pytest

from plexus import inbox
from plexus.inbox import (
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD,
    MIN_SEGMENT_BYTES,
    SEAL,
    SEGMENT_BYTES,
    Segment,
    decode,
    frame,
    header,
    read_segment,
    segment_gens,
    segment_path,
)


def raw_record(payload: bytes, length: int | None = None, crc: int | None = None,
               magic: bytes = MAGIC) -> bytes:
    return struct.pack("<2sII", magic, len(payload) if length is None else length,
                       zlib.crc32(payload) if crc is None else crc) + payload


def test_a_record_is_magic_length_crc_and_payload():
    record = frame(b"abc")
    assert HEADER_SIZE == 10
    assert record == MAGIC + struct.pack("<II", 3, zlib.crc32(b"abc")) + b"abc"


def test_decode_reads_records_up_to_the_end_exactly():
    blob = frame(b"a") + frame(b"bb") + frame(b"c" * 5)
    assert decode(blob) == ([b"a", b"bb", b"c" * 5], len(blob))
    assert decode(memoryview(blob)) == ([b"a", b"bb", b"c" * 5], len(blob))
    assert decode(b"") == ([], 0)


@pytest.mark.parametrize("bad", [
    raw_record(b"x", magic=b"\x00\x00"),      # zeros: the preallocated tail
    raw_record(b"x", length=0),               # length 0 is never written
    raw_record(b"xyz", crc=12345),            # a wrong checksum
    raw_record(b"xy")[:-1],                   # cut short
    raw_record(b"x" * 10, length=11),         # a length past the end
    frame(b"x")[:HEADER_SIZE - 1],            # less than a header
])
def test_decode_stops_at_the_first_invalid_record(bad):
    good = frame(b"one") + frame(b"two")
    payloads, used = decode(good + bad + frame(b"after"))
    assert payloads == [b"one", b"two"] and used == len(good)


def test_a_record_of_the_largest_size_is_read_and_one_byte_more_is_not():
    largest = b"x" * MAX_RECORD
    assert decode(frame(largest)) == ([largest], HEADER_SIZE + MAX_RECORD)
    too_big = raw_record(b"x" * (MAX_RECORD + 1))
    assert decode(too_big) == ([], 0)


def test_a_one_byte_record_is_read():
    assert decode(frame(b"z")) == ([b"z"], HEADER_SIZE + 1)


def test_a_record_ending_exactly_at_the_end_is_read():
    blob = frame(b"q" * 7)
    assert decode(blob)[1] == len(blob)
    assert decode(blob + b"\0" * 3)[0] == [b"q" * 7]  # a partial header after it


def test_segment_names_and_numbers(tmp_path: Path):
    db = tmp_path / "b.db"
    assert segment_path(db, 7) == tmp_path / "b.db.inbox.7"
    for name in ("b.db.inbox.10", "b.db.inbox.2", "b.db.inbox.x", "other.db.inbox.3"):
        (tmp_path / name).touch()
    assert segment_gens(db) == [2, 10]


def write_segment(path: Path, records: list[bytes], tag: str = "points",
                  sealed: bool = False, tail: bytes = b"\0" * 64) -> bytes:
    blob = header(tag) + b"".join(frame(r) for r in records)
    if sealed:
        blob += frame(SEAL)
    path.write_bytes(blob + tail)
    return blob


def test_read_segment_gives_codec_records_end_and_seal(tmp_path: Path):
    path = tmp_path / "b.db.inbox.3"
    blob = write_segment(path, [b"r1", b"r2"], tag="ingest:rig-01", sealed=True)
    seg = read_segment(path, 3)
    assert (seg.gen, seg.codec_tag, seg.records, seg.end, seg.sealed, seg.damaged_bytes) == \
        (3, "ingest:rig-01", [b"r1", b"r2"], len(blob), True, 0)


def test_an_unsealed_segment_says_so(tmp_path: Path):
    path = tmp_path / "s"
    blob = write_segment(path, [b"r1", b"r2"])
    seg = read_segment(path, 0)
    assert seg.sealed is False and seg.records == [b"r1", b"r2"] and seg.end == len(blob)


def test_a_segment_sealed_right_after_its_header_has_no_records(tmp_path: Path):
    path = tmp_path / "s"
    write_segment(path, [], sealed=True)
    seg = read_segment(path, 0)
    assert seg.sealed is True and seg.records == [] and seg.codec_tag == "points"


def test_an_empty_file_has_no_codec_and_is_not_sealed(tmp_path: Path):
    path = tmp_path / "s"
    path.write_bytes(b"\0" * 100)
    seg = read_segment(path, 0)
    assert (seg.codec_tag, seg.records, seg.end, seg.sealed, seg.damaged_bytes) == \
        (None, [], 0, False, 0)


def test_a_segment_without_a_codec_header_keeps_its_records(tmp_path: Path):
    path = tmp_path / "s"
    path.write_bytes(frame(b"r1") + frame(b"r2"))
    seg = read_segment(path, 0)
    assert seg.codec_tag is None and seg.records == [b"r1", b"r2"]


def test_a_codec_name_that_is_not_utf8_is_read_with_replacements(tmp_path: Path):
    path = tmp_path / "s"
    path.write_bytes(frame(b"\x00codec:ingest:\xff") + frame(b"r"))
    assert read_segment(path, 0).codec_tag == "ingest:\ufffd"


def test_reading_from_an_offset_skips_the_records_before_it(tmp_path: Path):
    path = tmp_path / "s"
    write_segment(path, [b"r1", b"r2", b"r3"])
    first_end = len(header("points")) + len(frame(b"r1"))
    assert read_segment(path, 0, start=0).records == [b"r1", b"r2", b"r3"]
    assert read_segment(path, 0, start=first_end).records == [b"r2", b"r3"]
    assert read_segment(path, 0, start=first_end - 1).records == [b"r1", b"r2", b"r3"]
    second_end = first_end + len(frame(b"r2"))
    assert read_segment(path, 0, start=second_end).records == [b"r3"]
    assert read_segment(path, 0, start=second_end - 1).records == [b"r2", b"r3"]


def test_garbage_after_the_readable_part_is_counted_as_damage(tmp_path: Path):
    path = tmp_path / "s"
    blob = write_segment(path, [b"r1"], tail=b"\x01\x02\x03" + b"\0" * 20)
    seg = read_segment(path, 0)
    assert seg.end == len(blob) and seg.damaged_bytes == 3


# --- Segment ------------------------------------------------------------------------------


def test_a_new_segment_is_preallocated_private_and_starts_with_its_codec(tmp_path: Path):
    db = tmp_path / "b.db"
    seg = Segment(db, 4, "ingest:rig-01")
    try:
        assert seg.path == tmp_path / "b.db.inbox.4" and seg.gen == 4
        assert seg.size == SEGMENT_BYTES and os.path.getsize(seg.path) == SEGMENT_BYTES
        assert stat.S_IMODE(os.stat(seg.path).st_mode) == 0o600
        assert seg.pos == len(header("ingest:rig-01")) and seg.dirty is True
        assert seg.codec_tag == "ingest:rig-01"
        seg.fsync()
        assert seg.dirty is False
    finally:
        seg.close()
    assert read_segment(seg.path, 4).codec_tag == "ingest:rig-01"


def test_a_segment_is_never_made_over_an_existing_file(tmp_path: Path):
    db = tmp_path / "b.db"
    segment_path(db, 1).write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        Segment(db, 1, "points")
    assert segment_path(db, 1).read_bytes() == b"someone else's"


def test_room_keeps_space_for_the_seal(tmp_path: Path):
    seg = Segment(tmp_path / "b.db", 0, "points", size=MIN_SEGMENT_BYTES)
    try:
        free = seg.size - seg.pos - HEADER_SIZE - len(SEAL)
        assert seg.room(free) and not seg.room(free + 1)
        seg.pos = seg.size - HEADER_SIZE - len(SEAL) - 5
        assert seg.room(5) and not seg.room(6)
        seg.seal()
        assert seg.pos == seg.size - 5
    finally:
        seg.close()


def test_a_full_disk_makes_smaller_segments_down_to_the_minimum(tmp_path: Path, monkeypatch):
    """posix_fallocate is the disk's answer; here it answers ENOSPC above 256 KiB."""
    import errno

    sizes: list[int] = []
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, size: int) -> None:
        sizes.append(size)
        assert offset == 0
        if size > 256 << 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(inbox.os, "posix_fallocate", fallocate)
    seg = Segment(tmp_path / "b.db", 0, "points")
    try:
        assert sizes == [4 << 20, 1 << 20, 256 << 10] and seg.size == 256 << 10
    finally:
        seg.close()


def test_a_disk_too_full_even_for_the_minimum_raises_and_leaves_no_file(tmp_path: Path,
                                                                          monkeypatch):
    import errno

    sizes: list[int] = []

    def fallocate(fd: int, offset: int, size: int) -> None:
        sizes.append(size)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inbox.os, "posix_fallocate", fallocate)
    with pytest.raises(OSError, match="No space left"):
        Segment(tmp_path / "b.db", 0, "points")
    assert sizes == [4 << 20, 1 << 20, 256 << 10, 64 << 10]
    assert not segment_path(tmp_path / "b.db", 0).exists()


def test_other_errors_while_preallocating_are_not_retried(tmp_path: Path, monkeypatch):
    import errno

    sizes: list[int] = []

    def fallocate(fd: int, offset: int, size: int) -> None:
        sizes.append(size)
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(inbox.os, "posix_fallocate", fallocate)
    with pytest.raises(OSError, match="I/O error"):
        Segment(tmp_path / "b.db", 0, "points")
    assert sizes == [4 << 20]
    assert not segment_path(tmp_path / "b.db", 0).exists()
