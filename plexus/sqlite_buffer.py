"""The persistent buffer: an append-only inbox file in front of a SQLite table.

Why two files: a committed SQLite transaction costs 20-70 µs here (40 µs in
WAL mode on ext4), far over our 12 µs budget for ``send()``. A single
``os.write`` to an append-only file costs about 2 µs and is just as safe
against ``kill -9``: once ``write`` returns, the bytes belong to the kernel,
not to our process. So:

- ``put`` frames the point (magic + length + CRC32 over both and the JSON)
  and appends it to the current inbox file ``<path>.inbox.<N>`` in one
  ``write`` before returning.
- A background thread, every ``sync_interval`` seconds, fsyncs the inbox,
  moves its records into SQLite (recording the generation and offset reached
  in the same transaction), checkpoints (fsyncs) SQLite, and starts inbox
  ``N+1``; file ``N`` is deleted after the next checkpoint. So the inbox
  holds about one round of points however long the stream, and a WAL lost to
  a power cut never points past a file that still exists. ``take`` also
  moves the inbox first, so the uploader never waits for that thread.
- On open, records past the recorded position are replayed into SQLite. The
  first invalid record (a torn write, or the zeros a power cut leaves where
  a file's size reached the disk before its data) ends the readable part of
  that file; the rest is discarded, counted and logged once.
- The batch in flight is recorded (once it has decoded); after a restart it
  is taken first, unchanged, so it keeps its Idempotency-Key. A stored row
  that does not decode is moved to the ``set_aside`` table, counted in
  ``lost`` and skipped: nothing on disk can stop delivery.

Guarantees: ``kill -9`` loses nothing whose ``put`` returned. A power cut
loses at most the last ``sync_interval`` seconds (default 1 s). Files that
cannot be opened as our buffer are moved aside with a timestamped name and a
fresh buffer starts. If the disk fills up, points are kept in memory
(counted in ``spilled``, a warning logged) and written to disk again when
space returns.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from plexus.buffer import Batch, Buffer, in_flight_limit
from plexus.errors import BufferingError
from plexus.point import Point
from plexus.ratelimit import RateLimitedLog

log = logging.getLogger("plexus.buffer")

DEFAULT_SQLITE_MAX_POINTS = 1_000_000
SCHEMA_VERSION = "3"
# An inbox record: magic, payload length, CRC32 of (magic + length + payload), payload.
# The magic and a checksum that covers the length make a block of zeros (what a
# file's tail holds when its new size reached the disk before its data) or any
# other garbage invalid: with a bare (length, crc) header, 8 zero bytes read as
# a valid empty record, since crc32(b"") == 0.
_MAGIC = b"\xa7\x5e"
_HEADER = struct.Struct("<2sII")
_MAX_RECORD = 1 << 20
_MOVE_CHUNK = 1 << 20  # bytes of inbox moved per transaction (bounds the transient memory)


def encode_record(point: Point) -> bytes:
    data = orjson.dumps(point)
    size = len(data).to_bytes(4, "little")
    return _HEADER.pack(_MAGIC, len(data), zlib.crc32(data, zlib.crc32(_MAGIC + size))) + data


def decode_records(blob: bytes) -> tuple[list[bytes], int, bool]:
    """Split inbox bytes into payloads; return (payloads, bytes used, invalid tail?).

    A record is valid only when its magic matches, its length is 1.._MAX_RECORD,
    it is complete and its checksum holds. The first invalid record ends the
    readable part: what follows it cannot be trusted to start on a record.
    """
    payloads = []
    pos, end = 0, len(blob)
    header = _HEADER.size
    unpack, crc32 = _HEADER.unpack_from, zlib.crc32
    while pos + header <= end:
        magic, length, crc = unpack(blob, pos)
        stop = pos + header + length
        if magic != _MAGIC or not 0 < length <= _MAX_RECORD or stop > end:
            break
        data = blob[pos + header:stop]
        if crc32(data, crc32(blob[pos:pos + 6])) != crc:
            break
        payloads.append(data)
        pos = stop
    return payloads, pos, pos != end


def _decode_v2_records(blob: bytes) -> tuple[list[bytes], int, bool]:
    """The inbox format of schema 2 (length + CRC of the payload), read once on upgrade."""
    payloads = []
    pos, end = 0, len(blob)
    while pos + 8 <= end:
        length, crc = struct.unpack_from("<II", blob, pos)
        stop = pos + 8 + length
        if not 0 < length <= _MAX_RECORD or stop > end or zlib.crc32(blob[pos + 8:stop]) != crc:
            break
        payloads.append(blob[pos + 8:stop])
        pos = stop
    return payloads, pos, pos != end


def decode_point(data: bytes) -> Point:
    """A stored point back as a tuple; ValueError when the bytes are not one."""
    row = orjson.loads(data)
    if type(row) is not list or len(row) != 4 or type(row[0]) is not str \
            or type(row[2]) is not int or not (row[3] is None or type(row[3]) is dict):
        raise ValueError(f"not a stored point: {data[:60]!r}")
    return tuple(row)  # type: ignore[return-value]


class _WrongSchema(Exception):
    pass


class SqliteBuffer(Buffer):
    """A persistent buffer that survives crashes, restarts and power cuts.

    Parameters:
        path: the SQLite file; the inbox lives beside it as ``<path>.inbox``.
        max_points: cap on stored points; beyond it the oldest waiting ones are
            deleted and counted in ``dropped``.
        sync_interval: seconds between fsyncs: the most a power cut can lose.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_points: int = DEFAULT_SQLITE_MAX_POINTS,
        sync_interval: float = 1.0,
    ) -> None:
        super().__init__(max_points)
        self.path = Path(path).expanduser()
        self.sync_interval = sync_interval
        self.spilled = 0  # points kept in memory because the disk was full
        self.torn_records = 0  # inbox files that ended in an invalid record at open
        self.lost: dict[str, int] = {}  # points that could not be read back, by reason
        self._lock = threading.Lock()  # the inbox fd and the counters
        self._db_lock = threading.Lock()  # the SQLite connection; taken before _lock
        self._spill: deque[tuple[bytes, int]] = deque()  # (framed records, point count)
        self._spill_points = 0
        self._in_flight: tuple[int, int] | None = None
        self._resume: tuple[int, int] | None = None  # the batch in flight when the last run ended
        self._undeleted: list[tuple[int, int]] = []  # acknowledged ranges a full disk kept
        self._retired: list[int] = []  # moved inbox generations, deleted after a checkpoint
        self._closed = False
        self._warn = RateLimitedLog(log, interval=30.0)  # a full disk fails every round

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = self._lock_file()
        try:
            self._conn = self._open_or_replace()
            self._gen = self._replay_inboxes()  # the inbox generation producers write to
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._inbox_fd, self._inbox_read_fd = self._open_inbox(self._gen)
        self._inbox_size = 0  # bytes written to the current inbox file
        self._moved = 0  # bytes of it already in SQLite
        # len() = puts - removed - spill_removed. Each counter has one writer at a
        # time (producers under _lock; ack and trim under _db_lock), so removing
        # points never waits for _lock, which busy producers could starve.
        self._puts = self._conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        self._removed = 0
        self._spill_removed = 0
        self._swap_wanted = False  # the sync thread asks the next put to start a new inbox
        self._swap_done = threading.Event()
        self._swapped_out: tuple[int, int, int, int, int] | None = None

        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, daemon=True,
                                        name=f"plexus-buffer-sync:{self.path.name}")
        self._thread.start()

    # Opening ---------------------------------------------------------------
    def _lock_file(self) -> int:
        # Two processes moving one inbox would duplicate or lose points: one owner only.
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BufferingError(
                f"the buffer {self.path} is in use by another process; give each client "
                "its own buffer_path (or source_id)") from None
        return fd

    def _open_or_replace(self) -> sqlite3.Connection:
        try:
            return self._open()
        except (sqlite3.DatabaseError, OSError, _WrongSchema) as exc:
            aside = self._move_aside()
            log.warning("buffer file %s could not be used (%s); moved it aside to %s and "
                        "started a fresh buffer", self.path, exc, aside)
            return self._open()

    def _open(self) -> sqlite3.Connection:
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise PermissionError(f"no read/write permission on {self.path}")
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # No fsync per commit: our sync thread checkpoints every sync_interval.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            # Rows are written once and read once, in id order: a big page cache
            # buys nothing, and the buffer must stay small on a Raspberry Pi.
            conn.execute("PRAGMA cache_size=-512")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            # AUTOINCREMENT: ids are never reused, even after the table empties,
            # so batch keys (built from ids) never repeat and a receiver that
            # drops duplicate Idempotency-Keys never drops new data.
            conn.execute("CREATE TABLE IF NOT EXISTS points "
                         "(id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL)")
            # Rows that could not be decoded: kept for inspection, counted as lost,
            # never in the way of the rows after them.
            conn.execute("CREATE TABLE IF NOT EXISTS set_aside "
                         "(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, data BLOB)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                conn.execute("INSERT INTO meta VALUES ('schema', ?), ('uuid', ?), "
                             "('inbox_gen', '0'), ('inbox_offset', '0')",
                             (SCHEMA_VERSION, uuid.uuid4().hex[:12]))
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            # Schema 2 differs only in the inbox framing: its inbox files are read
            # with the old decoder once, then the schema is raised (in _replay_inboxes).
            if meta.get("schema") not in (SCHEMA_VERSION, "2") or "uuid" not in meta:
                raise _WrongSchema(f"unexpected schema {meta.get('schema')!r}")
            self._old_inbox = meta["schema"] == "2"
            columns = [r[1] for r in conn.execute("PRAGMA table_info(points)")]
            if columns != ["id", "data"]:
                raise _WrongSchema(f"unexpected columns {columns}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        except BaseException:
            conn.close()
            raise
        self._uuid = meta["uuid"]
        self._replay_gen = int(meta.get("inbox_gen", "0") or 0)
        self._replay_from = int(meta.get("inbox_offset", "0") or 0)
        if meta.get("in_flight"):
            first, last = meta["in_flight"].split("-")
            self._resume = (int(first), int(last))
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.chmod(side, 0o600)
        return conn

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        # The inbox files stay: their records are replayed into the fresh database.
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                try:
                    shutil.move(src, f"{aside}{suffix}")
                except OSError:
                    src.unlink(missing_ok=True)
        return aside

    def inbox_file(self, gen: int) -> Path:
        """Inbox files are numbered: a new one starts once the last is all in SQLite."""
        return Path(f"{self.path}.inbox.{gen}")

    def _inbox_gens(self) -> list[int]:
        prefix = f"{self.path.name}.inbox."
        return sorted(int(f.name[len(prefix):]) for f in self.path.parent.glob(prefix + "*")
                      if f.name[len(prefix):].isdigit())

    def _open_inbox(self, gen: int) -> tuple[int, int]:
        path = self.inbox_file(gen)
        write_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        _fsync_dir(path.parent)  # the new name must survive a power cut as its data does
        return write_fd, os.open(path, os.O_RDONLY)

    def _set_position(self, gen: int, offset: int) -> None:
        """Record how far the inbox is in SQLite. Part of the caller's transaction."""
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_gen'", (str(gen),))
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_offset'", (str(offset),))

    def _replay_inboxes(self) -> int:
        """Move into SQLite what earlier runs left in inbox files; return the next generation."""
        gens = self._inbox_gens()
        recovered = 0
        conn = self._conn
        for gen in gens:
            if gen < self._replay_gen:
                continue  # already in SQLite; deleted below
            path = self.inbox_file(gen)
            try:
                blob = path.read_bytes()
            except OSError as exc:  # unreadable: set it aside, the buffer must come up
                aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(path, aside)
                log.warning("buffer inbox %s cannot be read (%s); moved it aside to %s",
                            path, exc, aside)
                continue
            start = min(self._replay_from, len(blob)) if gen == self._replay_gen else 0
            decode = _decode_v2_records if self._old_inbox else decode_records
            payloads, used, torn = decode(blob[start:])
            if torn:
                self.torn_records += 1
                log.warning("%s: the last %d bytes are not whole records (a write cut by a "
                            "crash or power cut, or a tail the disk never received) and "
                            "were discarded", path, len(blob) - start - used)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO points (data) VALUES (?)", [(p,) for p in payloads])
            self._set_position(gen, start + used)
            conn.execute("COMMIT")
            recovered += len(payloads)
        next_gen = max([*gens, self._replay_gen]) + 1
        conn.execute("BEGIN IMMEDIATE")
        self._set_position(next_gen, 0)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
        self._old_inbox = False
        conn.execute("PRAGMA wal_checkpoint(FULL)")  # on disk before the inbox files go
        for gen in gens:
            self.inbox_file(gen).unlink(missing_ok=True)
        if recovered:
            log.info("recovered %d points from the inbox of %s", recovered, self.path)
        return next_gen

    # Producer side ------------------------------------------------------------
    def put(self, point: Point) -> None:
        record = encode_record(point)
        with self._lock:
            self._write(record, 1)
            if len(self) >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def put_many(self, points: list[Point]) -> None:
        blob = b"".join(encode_record(p) for p in points)
        with self._lock:
            self._write(blob, len(points))
            if len(self) >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def _write(self, blob: bytes, n: int) -> None:
        """Append framed records to the inbox, or to memory if the disk is full. Holds _lock."""
        if self._swap_wanted:
            self._swap_inbox()
        if not self._spill:
            try:
                written = os.write(self._inbox_fd, blob)
                if written == len(blob):
                    self._inbox_size += written
                    self._puts += n
                    if len(self) > self.max_points:
                        self._kick.set()  # the sync thread trims the oldest
                    return
                # A short write means the disk filled up mid-record: cut it off so
                # the inbox stays a clean sequence of whole records.
                os.ftruncate(self._inbox_fd, self._inbox_size)
                raise OSError(errno.ENOSPC, "short write: disk full")
            except OSError as exc:
                log.warning("cannot write the buffer file %s (%s): keeping points in memory "
                            "until the disk has room again", self.inbox_file(self._gen), exc)
        self._spill.append((blob, n))
        self._spill_points += n
        self.spilled += n
        self._puts += n
        while self._spill_points > self.max_points:  # memory stays bounded too
            _, dropped = self._spill.popleft()
            self._spill_points -= dropped
            self._spill_removed += dropped
            self._count_drops(dropped)

    # Moving the inbox into SQLite ----------------------------------------------
    def _move_inbox(self) -> None:
        """Copy the current inbox file's records past ``_moved`` into SQLite.

        Caller holds ``_db_lock``.
        """
        conn = self._conn
        # Up to what is written now, not what producers add meanwhile: a fast
        # producer would otherwise keep this loop (and _db_lock) busy forever.
        end = self._inbox_size  # writes are whole records: end is a record boundary
        while True:
            size = min(end - self._moved, _MOVE_CHUNK)
            payloads: list[bytes] = []
            used = 0
            if size > 0:
                payloads, used, _ = decode_records(
                    os.pread(self._inbox_read_fd, size, self._moved))
            if not payloads:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO points (data) VALUES (?)", [(p,) for p in payloads])
                self._set_position(self._gen, self._moved + used)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise
            self._moved += used

    def _rotate(self) -> None:
        """Start a new inbox file; the old one is deleted after the next checkpoint.

        This is what keeps the inbox small under a steady stream: a file is
        never appended to again once it is retired. Busy producers would
        starve a thread waiting for ``_lock``, so the next ``put`` makes the
        switch itself (under the lock it holds anyway); only when no put comes
        does this thread take the lock. Caller holds ``_db_lock``.
        """
        if self._inbox_size == 0:
            return
        self._move_inbox()  # catch up first: only a short tail is left after the switch
        self._swap_done.clear()
        self._swap_wanted = True
        if not self._swap_done.wait(0.02):
            with self._lock:  # no producer came by, so the lock is free
                if self._swap_wanted:
                    self._swap_inbox()
        if self._swapped_out is None:  # no new file could be made
            return
        gen, write_fd, read_fd, size, moved = self._swapped_out
        self._swapped_out = None
        try:
            # Records written since this round's fsync would otherwise reach the disk
            # only by chance, while the new file is fsynced next round: a power cut
            # then keeps newer points and loses older ones (a hole, found by the
            # power-cut trials). Durable in order means this file first.
            os.fsync(write_fd)
        finally:
            os.close(write_fd)
        try:
            # The old file is frozen now: move its tail and record the new generation
            # in one transaction.
            tail, used, _ = decode_records(os.pread(read_fd, size - moved, moved))
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO points (data) VALUES (?)", [(p,) for p in tail])
                self._set_position(gen + 1, 0)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            os.close(read_fd)
        self._retired.append(gen)

    def _swap_inbox(self) -> None:
        """Point producers at a new inbox file. Caller holds ``_lock``."""
        self._swap_wanted = False
        try:
            fds = self._open_inbox(self._gen + 1)
        except OSError as exc:  # keep writing the current file; the next round tries again
            self._warn(logging.WARNING, "cannot start a new inbox file for %s: %s",
                       self.path, exc)
        else:
            self._swapped_out = (self._gen, self._inbox_fd, self._inbox_read_fd,
                                 self._inbox_size, self._moved)
            self._gen += 1
            self._inbox_fd, self._inbox_read_fd = fds
            self._inbox_size = self._moved = 0
        self._swap_done.set()

    def _restore_spill(self) -> None:
        with self._lock:
            while self._spill:
                blob, n = self._spill[0]
                try:
                    written = os.write(self._inbox_fd, blob)
                except OSError:
                    return
                if written != len(blob):
                    os.ftruncate(self._inbox_fd, self._inbox_size)
                    return
                self._inbox_size += written
                self._spill.popleft()
                self._spill_points -= n
            log.warning("the buffer file %s is writable again: points go to disk",
                        self.inbox_file(self._gen))

    def _trim(self) -> None:
        """Drop the oldest waiting points beyond the cap. Caller holds ``_db_lock``."""
        excess = len(self) - self.max_points
        if excess <= 0:
            return
        where, params = self._not_taken()
        cur = self._conn.execute(
            f"DELETE FROM points WHERE id IN (SELECT id FROM points WHERE {where} "
            "ORDER BY id LIMIT ?)", (*params, excess))
        if cur.rowcount > 0:
            self._removed += cur.rowcount
            self._count_drops(cur.rowcount)

    def _not_taken(self) -> tuple[str, tuple[int, ...]]:
        """SQL for the rows neither in flight nor acknowledged-but-undeleted."""
        ranges = [*self._undeleted, *([self._in_flight] if self._in_flight else [])]
        if not ranges:
            return "1", ()
        return (" AND ".join("id NOT BETWEEN ? AND ?" for _ in ranges),
                tuple(v for r in ranges for v in r))

    def _retry_deletes(self) -> None:
        for first, last in list(self._undeleted):
            self._conn.execute("DELETE FROM points WHERE id BETWEEN ? AND ?", (first, last))
            self._undeleted.remove((first, last))

    def sync(self) -> None:
        """Make everything buffered so far durable: fsync, move, checkpoint, rotate."""
        with self._db_lock:
            if self._closed:
                return
            os.fsync(self._inbox_fd)
            if self._spill:
                self._restore_spill()
            self._move_inbox()
            self._retry_deletes()
            self._trim()
            busy = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]
            if not busy:  # the WAL is fsynced: what retired inbox files held is safe
                for gen in self._retired:
                    self.inbox_file(gen).unlink(missing_ok=True)
                self._retired.clear()
            self._rotate()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.sync_interval)
            self._kick.clear()
            if self._stop.is_set():
                break
            try:
                self.sync()
            except (sqlite3.Error, OSError) as exc:  # keep going: the next round may succeed
                self._warn(logging.WARNING, "buffer sync of %s failed: %s", self.path, exc)

    # Uploader side -------------------------------------------------------------
    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        with self._db_lock:
            if self._in_flight is not None:
                raise RuntimeError("SqliteBuffer holds one batch in flight at a time")
            try:
                self._move_inbox()
                self._trim()  # never put points beyond the cap into flight
            except (sqlite3.Error, OSError) as exc:
                self._warn(logging.WARNING, "moving the inbox of %s failed: %s", self.path, exc)
            if self._resume is not None:
                # The batch in flight when the last run ended goes first, exactly as it
                # was, so it keeps its Idempotency-Key and a receiver can drop a repeat.
                rows = self._conn.execute(
                    "SELECT id, data FROM points WHERE id BETWEEN ? AND ? ORDER BY id",
                    self._resume).fetchall()
                self._resume = None
            else:
                rows = []
            points = self._decode_rows(rows)
            limit = min(max_points, in_flight_limit(self.max_points))
            while not rows:
                where, params = self._not_taken()
                order = "DESC" if newest else "ASC"
                rows = self._conn.execute(
                    f"SELECT id, data FROM points WHERE {where} ORDER BY id {order} LIMIT ?",
                    (*params, limit)).fetchall()
                if not rows:
                    break
                if newest:
                    rows.reverse()
                points = self._decode_rows(rows)  # empty only if every row was set aside
            if not rows:
                return self._take_spilled(min(max_points, in_flight_limit(self.max_points)))
            # Recorded only now that every row decoded: a batch that cannot be read
            # must never be the first thing every restart tries to send.
            first, last = rows[0][0], rows[-1][0]
            self._in_flight = (first, last)
            try:
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('in_flight', ?)",
                                   (f"{first}-{last}",))
            except sqlite3.Error as exc:  # only costs a possible duplicate after a crash
                log.debug("recording the batch in flight failed: %s", exc)
        return Batch(f"{self._uuid}-{first}-{last}-{len(rows)}", points, (first, last))

    def _decode_rows(self, rows: list[tuple[int, bytes]]) -> list[Point]:
        """Decode rows in place; rows that do not decode are set aside (and removed
        from ``rows``), so one bad row never stops delivery. Caller holds _db_lock."""
        points: list[Point] = []
        bad: list[tuple[int, bytes, str]] = []
        for row_id, data in rows:
            try:
                points.append(decode_point(data))
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                bad.append((row_id, data, str(exc)))
        if bad:
            self._set_aside(bad)
            ids = {b[0] for b in bad}
            rows[:] = [r for r in rows if r[0] not in ids]
        return points

    def _set_aside(self, bad: list[tuple[int, bytes, str]]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO set_aside (id, reason, data) VALUES (?, ?, ?)",
                             [(i, f"undecodable: {reason}"[:200], data) for i, data, reason in bad])
            conn.executemany("DELETE FROM points WHERE id = ?", [(i,) for i, _, _ in bad])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Still skip them in this run; the next open tries again.
            self._undeleted += [(i, i) for i, _, _ in bad]
            log.warning("could not set aside undecodable rows of %s: %s", self.path, exc)
        self._removed += len(bad)
        self.lost["undecodable"] = self.lost.get("undecodable", 0) + len(bad)
        log.error("%d points in %s could not be decoded; they were set aside (table "
                  "set_aside, ids %d..%d) and counted as lost; delivery goes on", len(bad),
                  self.path, bad[0][0], bad[-1][0])

    def _take_spilled(self, limit: int) -> Batch | None:
        # The disk is full and SQLite is drained: deliver from memory meanwhile.
        blobs: list[bytes] = []
        n = 0
        with self._lock:
            while self._spill and n < limit:
                blob, count = self._spill.popleft()
                blobs.append(blob)
                n += count
            self._spill_points -= n
        if not blobs:
            return None
        self._in_flight = (0, 0)
        blob = b"".join(blobs)
        payloads, _, _ = decode_records(blob)
        points = [decode_point(p) for p in payloads]  # our own bytes, never on disk
        return Batch(f"{self._uuid}-mem-{uuid.uuid4().hex[:8]}", points, ("spill", blob, n))

    def ack(self, batch: Batch) -> None:
        if batch.handle[0] == "spill":
            with self._db_lock:
                self._in_flight = None
                self._removed += batch.handle[2]
            return
        first, last = batch.handle
        with self._db_lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM points WHERE id BETWEEN ? AND ?", (first, last))
                conn.execute("DELETE FROM meta WHERE key = 'in_flight'")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # A full disk can refuse even a DELETE (the WAL must grow). The points
                # are delivered: skip them from now on and delete them later.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._undeleted.append((first, last))
                log.warning("could not delete delivered points from %s (%s); will retry",
                            self.path, exc)
            self._in_flight = None
            self._removed += len(batch.points)
        if len(self) <= self.max_points // 2:
            self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        # The record of the batch in flight stays: its outcome may be unknown (a
        # timed-out request), so the next run sends exactly it again, same key.
        with self._db_lock:
            self._in_flight = None
            if batch.handle[0] == "spill":
                with self._lock:
                    self._spill.appendleft((batch.handle[1], batch.handle[2]))
                    self._spill_points += batch.handle[2]

    def __len__(self) -> int:
        return self._puts - self._removed - self._spill_removed

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        self._kick.set()
        self._thread.join()
        try:
            self.sync()
        except (sqlite3.Error, OSError) as exc:
            log.warning("final sync of %s failed: %s", self.path, exc)
        with self._db_lock:
            self._closed = True
            if self._spill:
                log.warning("%d points could not be written to %s (disk full) and are lost",
                            self._spill_points, self.path)
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                for gen in self._retired:
                    self.inbox_file(gen).unlink(missing_ok=True)
            except sqlite3.Error as exc:
                log.warning("final checkpoint of %s failed: %s", self.path, exc)
            self._conn.close()
            os.close(self._inbox_fd)
            os.close(self._inbox_read_fd)
            if self._inbox_size == 0:  # nothing was written since the last rotation
                self.inbox_file(self._gen).unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the lock


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; nothing more to do
        pass
    finally:
        os.close(fd)


def buffer_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a persistent buffer without taking it over (for ``plexus-gateway buffer``)."""
    p = Path(path).expanduser()
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        count, first, last = conn.execute(
            "SELECT COUNT(*), MIN(id), MAX(id) FROM points").fetchone()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        stamps = [_stamp(conn.execute("SELECT data FROM points WHERE id = ?",
                                      (i,)).fetchone()[0])
                  for i in (first, last) if i is not None]
    finally:
        conn.close()
    meta_gen, offset = int(meta.get("inbox_gen", 0) or 0), int(meta.get("inbox_offset", 0) or 0)
    prefix = f"{p.name}.inbox."
    pending = 0
    size = sum(Path(f"{p}{s}").stat().st_size for s in ("", "-wal") if Path(f"{p}{s}").exists())
    for f in sorted(p.parent.glob(prefix + "*")):
        gen = f.name[len(prefix):]
        if not gen.isdigit() or int(gen) < meta_gen:
            continue
        blob = f.read_bytes()
        size += len(blob)
        decode = _decode_v2_records if meta.get("schema") == "2" else decode_records
        payloads, _, _ = decode(blob[offset:] if int(gen) == meta_gen else blob)
        pending += len(payloads)
        stamps += [_stamp(x) for x in (payloads[:1] + payloads[-1:])]
    known = [s for s in stamps if s is not None]
    return {"path": str(p), "points": count + pending,
            "oldest_ms": min(known) if known else None,
            "newest_ms": max(known) if known else None, "bytes": size}


def _stamp(data: bytes) -> int | None:
    try:
        return decode_point(data)[2]
    except ValueError:
        return None
