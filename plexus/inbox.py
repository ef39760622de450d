"""The persistent buffer's inbox: mapped, preallocated segment files of framed records.

A record is written into a memory-mapped file before ``put`` returns. The
pages belong to the kernel's page cache the moment the copy is done, so a
``kill -9`` loses nothing; the buffer's sync thread fsyncs them every
``sync_interval`` against a power cut. Mapping instead of ``os.write`` takes
the system call off ``send()``'s path (about 0.2 µs against 1.5-3 µs).

Each segment ``<db>.inbox.<N>`` is preallocated (``posix_fallocate``), so a
full disk shows itself when a segment is made, never as a fault while
writing into the mapping. Its layout:

- a header record naming the codec its records were written with;
- records: magic (2 bytes), payload length (4, never 0), CRC32 of the
  payload (4), payload. A block of zeros (the preallocated tail, or what a
  power cut leaves where the file's data never reached the disk) fails the
  magic; other garbage fails the magic, the length or the checksum (a wrong
  length frames a wrong payload, whose checksum then fails);
- a seal record when the writer moved on to the next segment.

Reading back (after a crash) stops at the first invalid record; a segment
without its seal means a power cut lost its tail, and the records of any
later segment are discarded too, so what is recovered is always an exact
prefix of what was written.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\xa7\x5e"
_HEADER = struct.Struct("<2sII")
HEADER_SIZE = _HEADER.size
MAX_RECORD = 1 << 20
SEGMENT_BYTES = 4 << 20
MIN_SEGMENT_BYTES = 64 << 10
# Payloads no codec can produce (JSON never starts with NUL).
SEAL = b"\x00seal"
_CODEC_PREFIX = b"\x00codec:"
_crc32 = zlib.crc32
_pack = _HEADER.pack


def frame(payload: bytes) -> bytes:
    """One record: header + payload. (``SqliteBuffer.put`` inlines this.)"""
    return _pack(MAGIC, len(payload), _crc32(payload)) + payload


def decode(blob: bytes | memoryview) -> tuple[list[bytes], int]:
    """Split framed bytes into payloads; return (payloads, bytes used).

    A record is valid only when its magic matches, its length is 1..MAX_RECORD,
    it is complete and its checksum holds; the first invalid one ends the
    readable part (what follows cannot be trusted to start on a record).
    """
    data = bytes(blob)
    payloads = []
    pos, end = 0, len(data)
    unpack = _HEADER.unpack_from
    while pos + HEADER_SIZE <= end:
        magic, length, crc = unpack(data, pos)
        stop = pos + HEADER_SIZE + length
        if magic != MAGIC or not 0 < length <= MAX_RECORD or stop > end:
            break
        payload = data[pos + HEADER_SIZE:stop]
        if _crc32(payload) != crc:
            break
        payloads.append(payload)
        pos = stop
    return payloads, pos


def header(codec_tag: str) -> bytes:
    """The first record of a segment: the codec its records are written with."""
    return frame(_CODEC_PREFIX + codec_tag.encode())


def segment_path(db: Path, gen: int) -> Path:
    return Path(f"{db}.inbox.{gen}")


def segment_gens(db: Path) -> list[int]:
    prefix = f"{db.name}.inbox."
    return sorted(int(f.name[len(prefix):]) for f in db.parent.glob(prefix + "*")
                  if f.name[len(prefix):].isdigit())


@dataclass
class ReadSegment:
    """What a segment file holds, read back after a crash or a restart."""

    gen: int
    codec_tag: str | None
    records: list[bytes]  # the payloads past the starting offset
    end: int  # the offset where the readable part ends
    sealed: bool
    damaged_bytes: int  # non-zero bytes after the readable part (a torn write)


def read_segment(path: Path, gen: int, start: int = 0) -> ReadSegment:
    """Read a segment from ``start`` (0: from its header). Raises OSError."""
    blob = path.read_bytes()
    payloads, used = decode(blob)
    tag = None
    if payloads and payloads[0].startswith(_CODEC_PREFIX):
        tag = payloads[0][len(_CODEC_PREFIX):].decode("utf-8", "replace")
    sealed = bool(payloads) and payloads[-1] == SEAL
    # Offsets of each record, to skip those before ``start``.
    records, pos = [], 0
    for p in payloads:
        pos += HEADER_SIZE + len(p)
        if pos > start and not p.startswith(b"\x00"):
            records.append(p)
    rest = blob[used:]
    damaged = len(rest.rstrip(b"\0"))  # up to the last non-zero byte: a torn write
    return ReadSegment(gen, tag, records, used, sealed, damaged)


class Segment:
    """One preallocated, mapped inbox file being written."""

    def __init__(self, db: Path, gen: int, codec_tag: str, size: int | None = None) -> None:
        self.gen = gen
        self.path = segment_path(db, gen)
        self.size = size = size or SEGMENT_BYTES
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # A full disk fails here, never as a fault while writing into the map.
            # On a nearly full disk a smaller segment still lets points go to disk.
            while True:
                try:
                    os.posix_fallocate(fd, 0, size)
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC or size <= MIN_SEGMENT_BYTES:
                        raise
                    size //= 4
            self.size = size
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self.fd = fd
        fsync_dir(self.path.parent)  # the new name must survive a power cut as its data does
        first = header(codec_tag)
        self.map[:len(first)] = first
        self.pos = len(first)
        self.codec_tag = codec_tag
        self.dirty = True  # written since the last fsync

    def room(self, n: int) -> bool:
        """Whether ``n`` more bytes fit, keeping space for the seal."""
        return self.pos + n + HEADER_SIZE + len(SEAL) <= self.size

    def seal(self) -> None:
        record = frame(SEAL)
        self.map[self.pos:self.pos + len(record)] = record
        self.pos += len(record)

    def fsync(self) -> None:
        os.fsync(self.fd)
        self.dirty = False

    def close(self) -> None:
        try:
            self.map.close()
        finally:
            os.close(self.fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; nothing more to do
        pass
    finally:
        os.close(fd)
