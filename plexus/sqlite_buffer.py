"""The persistent buffer: an append-only inbox file in front of a SQLite table.

Why two files: a committed SQLite transaction costs 20-70 µs here (40 µs in
WAL mode on ext4), far over our 12 µs budget for ``send()``. A single
``os.write`` to an append-only file costs about 2 µs and is just as safe
against ``kill -9``: once ``write`` returns, the bytes belong to the kernel,
not to our process. So:

- ``put`` frames the point (length + CRC32 + JSON) and appends it to
  ``<path>.inbox`` in one ``write`` before returning.
- A background thread, every ``sync_interval`` seconds, fsyncs the inbox,
  moves its records into SQLite (one transaction, recording how far it got
  in the same transaction), checkpoints (fsyncs) SQLite, and only then
  truncates the inbox. ``take`` also moves the inbox first, so the uploader
  never waits for that thread.
- On open, records past the recorded offset are replayed into SQLite. A torn
  record at the end (power cut mid-write) fails its CRC and is dropped, with
  everything after it, and logged.

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

log = logging.getLogger("plexus.buffer")

DEFAULT_SQLITE_MAX_POINTS = 1_000_000
SCHEMA_VERSION = "2"
_HEADER = struct.Struct("<II")  # payload length, CRC32 of the payload
_MAX_RECORD = 1 << 20
_MOVE_CHUNK = 1 << 20  # bytes of inbox moved per transaction (bounds the transient memory)


def encode_record(point: Point) -> bytes:
    data = orjson.dumps(point)
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def decode_records(blob: bytes) -> tuple[list[bytes], int, bool]:
    """Split inbox bytes into payloads; return (payloads, bytes used, torn tail?)."""
    payloads = []
    pos, end = 0, len(blob)
    header = _HEADER.size
    while pos + header <= end:
        length, crc = _HEADER.unpack_from(blob, pos)
        stop = pos + header + length
        if length > _MAX_RECORD or stop > end:
            break
        data = blob[pos + header:stop]
        if zlib.crc32(data) != crc:
            break
        payloads.append(data)
        pos = stop
    return payloads, pos, pos != end


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
        self.inbox_path = Path(f"{self.path}.inbox")
        self.sync_interval = sync_interval
        self.spilled = 0  # points kept in memory because the disk was full
        self.torn_records = 0  # records lost to a torn write found at open
        self._lock = threading.Lock()  # the inbox fd and the counters
        self._db_lock = threading.Lock()  # the SQLite connection; taken before _lock
        self._spill: deque[tuple[bytes, int]] = deque()  # (framed records, point count)
        self._spill_points = 0
        self._in_flight: tuple[int, int] | None = None
        self._closed = False

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = self._lock_file()
        try:
            self._conn = self._open_or_replace()
            self._replay_inbox()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._inbox_fd = os.open(self.inbox_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._inbox_read_fd = os.open(self.inbox_path, os.O_RDONLY)
        self._inbox_size = 0  # bytes written to the inbox (it was emptied by the replay)
        self._moved = 0  # bytes of the inbox already in SQLite
        self._count = self._conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]

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
        for p in (self.path, self.inbox_path):
            if p.exists() and not os.access(p, os.R_OK | os.W_OK):
                raise PermissionError(f"no read/write permission on {p}")
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
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                conn.execute("INSERT INTO meta VALUES ('schema', ?), ('uuid', ?), "
                             "('inbox_offset', '0')", (SCHEMA_VERSION, uuid.uuid4().hex[:12]))
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != SCHEMA_VERSION or "uuid" not in meta:
                raise _WrongSchema(f"unexpected schema {meta.get('schema')!r}")
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
        self._replay_from = int(meta.get("inbox_offset", "0") or 0)
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
        # The inbox stays: its records are replayed into the fresh database.
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                try:
                    shutil.move(src, f"{aside}{suffix}")
                except OSError:
                    src.unlink(missing_ok=True)
        return aside

    def _replay_inbox(self) -> None:
        """Move inbox records the last run did not move into SQLite, then empty the inbox."""
        try:
            blob = self.inbox_path.read_bytes()
        except FileNotFoundError:
            return
        start = self._replay_from if self._replay_from <= len(blob) else 0
        payloads, used, torn = decode_records(blob[start:])
        if torn:
            self.torn_records = 1
            log.warning("%s: %d bytes at the end were a torn or corrupt record (a power cut "
                        "mid-write) and were discarded", self.inbox_path, len(blob) - start - used)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO points (data) VALUES (?)", [(p,) for p in payloads])
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'inbox_offset'")
        conn.execute("COMMIT")
        self._conn.execute("PRAGMA wal_checkpoint(FULL)")  # on disk before the inbox goes
        os.truncate(self.inbox_path, 0)
        if payloads:
            log.info("recovered %d points from %s", len(payloads), self.inbox_path)

    # Producer side ------------------------------------------------------------
    def put(self, point: Point) -> None:
        record = encode_record(point)
        with self._lock:
            self._write(record, 1)
            if self._count >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def put_many(self, points: list[Point]) -> None:
        blob = b"".join(encode_record(p) for p in points)
        with self._lock:
            self._write(blob, len(points))
            if self._count >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def _write(self, blob: bytes, n: int) -> None:
        """Append framed records to the inbox, or to memory if the disk is full. Holds _lock."""
        if not self._spill:
            try:
                written = os.write(self._inbox_fd, blob)
                if written == len(blob):
                    self._inbox_size += written
                    self._count += n
                    if self._count > self.max_points:
                        self._kick.set()  # the sync thread trims the oldest
                    return
                # A short write means the disk filled up mid-record: cut it off so
                # the inbox stays a clean sequence of whole records.
                os.ftruncate(self._inbox_fd, self._inbox_size)
                raise OSError(errno.ENOSPC, "short write: disk full")
            except OSError as exc:
                log.warning("cannot write the buffer file %s (%s): keeping points in memory "
                            "until the disk has room again", self.inbox_path, exc)
        self._spill.append((blob, n))
        self._spill_points += n
        self.spilled += n
        self._count += n
        while self._spill_points > self.max_points:  # memory stays bounded too
            _, dropped = self._spill.popleft()
            self._spill_points -= dropped
            self._count -= dropped
            self._count_drops(dropped)

    # Moving the inbox into SQLite ----------------------------------------------
    def _move_inbox(self) -> None:
        """Copy inbox records past ``_moved`` into SQLite. Caller holds ``_db_lock``."""
        while True:
            end = self._inbox_size
            if end <= self._moved:
                return
            blob = os.pread(self._inbox_read_fd, min(end - self._moved, _MOVE_CHUNK), self._moved)
            payloads, used, _ = decode_records(blob)
            if not payloads:
                return  # only a partial record so far: a writer is mid-write
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO points (data) VALUES (?)", [(p,) for p in payloads])
                conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_offset'",
                             (str(self._moved + used),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._moved += used

    def _truncate_inbox_if_moved(self) -> None:
        """Empty the inbox once all of it is in SQLite and fsynced. Caller holds ``_db_lock``."""
        with self._lock:
            if self._moved and self._inbox_size == self._moved:
                os.ftruncate(self._inbox_fd, 0)
                self._inbox_size = self._moved = 0
                self._conn.execute("UPDATE meta SET value = '0' WHERE key = 'inbox_offset'")

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
                        self.inbox_path)

    def _trim(self) -> None:
        """Drop the oldest waiting points beyond the cap. Caller holds ``_db_lock``."""
        excess = self._count - self.max_points
        if excess <= 0:
            return
        first, last = self._in_flight or (0, -1)
        cur = self._conn.execute(
            "DELETE FROM points WHERE id IN (SELECT id FROM points WHERE id NOT BETWEEN ? AND ? "
            "ORDER BY id LIMIT ?)", (first, last, excess))
        if cur.rowcount > 0:
            with self._lock:
                self._count -= cur.rowcount
            self._count_drops(cur.rowcount)

    def sync(self) -> None:
        """Make everything buffered so far durable: fsync, move, checkpoint, truncate."""
        with self._db_lock:
            if self._closed:
                return
            os.fsync(self._inbox_fd)
            if self._spill:
                self._restore_spill()
            self._move_inbox()
            self._trim()
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # fsyncs the WAL first
            self._truncate_inbox_if_moved()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.sync_interval)
            self._kick.clear()
            if self._stop.is_set():
                break
            try:
                self.sync()
            except (sqlite3.Error, OSError) as exc:  # keep going: the next round may succeed
                log.warning("buffer sync of %s failed: %s", self.path, exc)

    # Uploader side -------------------------------------------------------------
    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        with self._db_lock:
            if self._in_flight is not None:
                raise RuntimeError("SqliteBuffer holds one batch in flight at a time")
            try:
                self._move_inbox()
                self._trim()  # never put points beyond the cap into flight
            except (sqlite3.Error, OSError) as exc:
                log.warning("moving the inbox of %s failed: %s", self.path, exc)
            order = "DESC" if newest else "ASC"
            limit = min(max_points, in_flight_limit(self.max_points))
            rows = self._conn.execute(
                f"SELECT id, data FROM points ORDER BY id {order} LIMIT ?", (limit,)
            ).fetchall()
            if not rows:
                return self._take_spilled()
            if newest:
                rows.reverse()
            first, last = rows[0][0], rows[-1][0]
            self._in_flight = (first, last)
        loads = orjson.loads
        points: list[Point] = [tuple(loads(data)) for _, data in rows]  # type: ignore[misc]
        return Batch(f"{self._uuid}-{first}-{last}-{len(rows)}", points, (first, last))

    def _take_spilled(self) -> Batch | None:
        # The disk is full and SQLite is drained: deliver from memory meanwhile.
        with self._lock:
            if not self._spill:
                return None
            blob, n = self._spill.popleft()
            self._spill_points -= n
        self._in_flight = (0, 0)
        payloads, _, _ = decode_records(blob)
        points: list[Point] = [tuple(orjson.loads(p)) for p in payloads]  # type: ignore[misc]
        return Batch(f"{self._uuid}-mem-{uuid.uuid4().hex[:8]}", points, ("spill", blob, n))

    def ack(self, batch: Batch) -> None:
        if batch.handle[0] == "spill":
            with self._db_lock, self._lock:
                self._in_flight = None
                self._count -= batch.handle[2]
            return
        first, last = batch.handle
        with self._db_lock:
            cur = self._conn.execute("DELETE FROM points WHERE id BETWEEN ? AND ?", (first, last))
            self._in_flight = None
            with self._lock:
                self._count -= cur.rowcount
                count = self._count
        if count <= self.max_points // 2:
            self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        with self._db_lock:
            self._in_flight = None
            if batch.handle[0] == "spill":
                with self._lock:
                    self._spill.appendleft((batch.handle[1], batch.handle[2]))
                    self._spill_points += batch.handle[2]

    def __len__(self) -> int:
        return self._count

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
            except sqlite3.Error as exc:
                log.warning("final checkpoint of %s failed: %s", self.path, exc)
            self._conn.close()
            os.close(self._inbox_fd)
            os.close(self._inbox_read_fd)
            os.close(self._lock_fd)  # releases the lock


def buffer_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a persistent buffer without taking it over (for ``plexus-gateway buffer``)."""
    p = Path(path).expanduser()
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        count, first, last = conn.execute(
            "SELECT COUNT(*), MIN(id), MAX(id) FROM points").fetchone()
        offset = int(dict(conn.execute("SELECT key, value FROM meta").fetchall())
                     .get("inbox_offset", 0) or 0)
        stamps = [orjson.loads(conn.execute("SELECT data FROM points WHERE id = ?",
                                            (i,)).fetchone()[0])[2]
                  for i in (first, last) if i is not None]
    finally:
        conn.close()
    inbox = Path(f"{p}.inbox")
    pending: list[bytes] = []
    if inbox.exists():
        blob = inbox.read_bytes()
        pending, _, _ = decode_records(blob[offset:] if offset <= len(blob) else blob)
        stamps += [orjson.loads(pending[0])[2], orjson.loads(pending[-1])[2]] if pending else []
    size = sum(Path(f"{p}{s}").stat().st_size for s in ("", "-wal", ".inbox")
               if Path(f"{p}{s}").exists())
    return {"path": str(p), "points": count + len(pending),
            "oldest_ms": min(stamps) if stamps else None,
            "newest_ms": max(stamps) if stamps else None, "bytes": size}
