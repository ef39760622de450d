"""The persistent buffer: a mapped inbox in front of compressed blocks in SQLite.

Why two stores: a committed SQLite transaction costs 20-70 µs, far over the
budget of ``send()``. So:

- ``put`` encodes the point once, with the codec of the lane's sink (for the
  Plexus sink, the point object of an ``/ingest`` body), frames it and copies
  it into the current inbox segment, a preallocated memory-mapped file (see
  :mod:`plexus.inbox`), before returning; the record is also kept in memory.
- A background thread, every ``sync_interval`` seconds, fsyncs the inbox
  segments written since the last round (oldest first), moves the records
  into SQLite as **blocks** (up to 10,000 points each: the records joined
  into what the sink sends, gzipped; for the Plexus sink a whole request
  body) together with the inbox position reached, in one transaction, and
  checkpoints the WAL. Segments whose records are all in SQLite are deleted
  after that checkpoint. ``take`` moves first too, so the uploader never
  waits for that thread, and the blocks are as big as the backlog allows.
- ``take`` returns whole blocks, oldest first (or newest, to let live data
  overtake a backlog). A single block goes on the wire as it was stored;
  several are joined into one body. A block's CRC is checked before it is
  taken; a block that fails is set aside (kept in the table ``set_aside``),
  counted in ``lost`` and skipped: nothing stored can stop delivery.
- The batch in flight is recorded; after a restart it is taken first,
  unchanged, with the same key.

Guarantees: ``kill -9`` loses nothing whose ``put`` returned. A power cut
loses at most what was put after the last completed sync began (about
``sync_interval``, 1 s by default), and what it keeps is an exact prefix.

Caps: ``max_points`` and ``max_bytes`` (compressed bytes in SQLite plus the
records not yet moved). When full, producers wait while the sink delivers
(``when_full="block"``); otherwise the oldest blocks not in flight are
dropped, whole, counted in ``dropped``. If the disk fills up, points are
kept in memory (``spilled``, at most 100,000, the oldest dropped beyond) and
stored once there is room; blocks already on disk keep being delivered, and
while SQLite cannot take more, records are sent straight from memory.

Losses are stored with the points: the table ``counters`` holds, by reason,
how many points were dropped (``buffer_full``), refused by the sink
(``rejected``) or could not be read back (``unreadable``, ``after_gap``)
since the file was made, each written in the transaction that deleted the
points (or, for points dropped from memory, the next one). A crash never
takes a count with it; :meth:`SqliteBuffer.loss_counts` reads them.

Files that cannot be opened as our buffer are moved aside with a
timestamped name and a fresh buffer starts. Buffers of earlier schemas (one
SQLite row per point) are converted to blocks when opened.
"""

from __future__ import annotations

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plexus import inbox
from plexus.buffer import Batch, Buffer, WhenFull, in_flight_limit
from plexus.codec import POINTS, PointCodec, codec_for_tag, compress, decompress
from plexus.errors import BufferingError
from plexus.point import Point
from plexus.ratelimit import RateLimitedLog

log = logging.getLogger("plexus.buffer")

SCHEMA_VERSION = "4"
DEFAULT_SQLITE_MAX_POINTS = 1_000_000_000
#: 2 GiB: a week of a 1,000-point/s stream needs about 4 GB at ~7 bytes a point;
#: the default keeps a 16 GB SD card far from full. Raise it for longer outages.
DEFAULT_SQLITE_MAX_BYTES = 2 << 30
BLOCK_POINTS = 10_000  # the most points a request may carry
BLOCK_RAW_BYTES = 2 << 20  # uncompressed bytes per block; a request may carry 5 MiB
_MOVE_AT_RECORDS = 50_000  # records waiting in memory that wake the sync thread
_SPILL_MAX_POINTS = 100_000  # points kept in memory while the disk is full
_BATCH_RAW_BYTES = 4 << 20  # blocks joined into one request stay under 5 MiB
_SEAL_ROOM = inbox.HEADER_SIZE + len(inbox.SEAL)  # kept free at a segment's end
_MAGIC, _HEADER_SIZE, _pack_header, _crc32 = (inbox.MAGIC, inbox.HEADER_SIZE,
                                              inbox._HEADER.pack, zlib.crc32)


# Adds a count to the stored one; part of the caller's transaction.
_ADD_COUNT = ("INSERT INTO counters (name, value) VALUES (?, ?) "
              "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value")
# How ``lost`` reasons (as logged) are named among the stored counts.
_LOSS_KEYS = {"after a gap": "after_gap", "unreadable": "unreadable"}


class _WrongSchema(Exception):
    pass


class SqliteBuffer(Buffer):
    """A persistent buffer that survives crashes, restarts and power cuts.

    Parameters:
        path: the SQLite file; the inbox segments live beside it as ``<path>.inbox.<N>``.
        max_points: cap on stored points (default: no practical limit, the
            byte cap governs).
        sync_interval: seconds between fsyncs: about the most a power cut can lose.
        max_bytes: cap on stored bytes (compressed), default 2 GiB.
        when_full: ``"block"`` or ``"drop_oldest"`` (see :mod:`plexus.buffer`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_points: int = DEFAULT_SQLITE_MAX_POINTS,
        sync_interval: float = 1.0,
        *,
        max_bytes: int = DEFAULT_SQLITE_MAX_BYTES,
        when_full: WhenFull = "block",
    ) -> None:
        super().__init__(max_points, when_full)
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes
        self.sync_interval = sync_interval
        self.block_points = max(1, min(BLOCK_POINTS, max_points // 4))
        self.spilled = 0  # points kept in memory because the disk was full
        self.torn_records = 0  # inbox segments whose readable part ended early at open
        self.lost: dict[str, int] = {}  # points that could not be read back, by reason
        # Losses since the file was made (stored), and the part not stored yet.
        self._counts_lock = threading.Lock()  # innermost: nothing is taken while held
        self._totals: dict[str, int] = {}
        self._unsaved: dict[str, int] = {}
        self._lock = threading.Lock()  # producers: the segment, the pending records
        self._room = threading.Condition(self._lock)
        self._db_lock = threading.Lock()  # the SQLite connection; taken before _lock
        self._warn = RateLimitedLog(log, interval=30.0)  # a full disk fails every round
        self._closed = False

        # Producer side (under _lock).
        self._segment: inbox.Segment | None = None  # written now; made at the first put
        self._sealed: list[inbox.Segment] = []  # older ones still on disk, oldest first
        self._spare: inbox.Segment | None = None  # the next one, made ahead of time
        self._half_kicked = False  # the sync thread was asked to make the spare
        self._pending: list[bytes] = []  # records not in SQLite yet, oldest first
        self._pending_bytes = 0
        self._spilling = False
        self._spilled_now = 0  # pending records that are in no segment
        self._wake_next = False
        self._signalled = False  # the uploader was woken since its last take
        self._attention = 0  # pending records that need put's slow path
        self._record: Callable[[Point], bytes] = POINTS.record
        # Uploader side (under _db_lock).
        self._in_flight: Any = None  # what the batch in flight holds (see take)
        self._in_flight_memory = 0  # points of it taken straight from memory
        self._resume: tuple[int, int, int] | None = None  # (first, last, count) to take first
        self._undeleted: list[int] = []  # delivered blocks a full disk would not let us delete
        self._retired: list[inbox.Segment] = []  # moved segments, deleted after a checkpoint
        self._block_points = self._block_bytes = 0
        self._moving = 0  # records between the pending list and SQLite

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = self._lock_file()
        try:
            self._conn = self._open_or_replace()
            self._gen = self._recover()  # the next segment's number
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._block_points, self._block_bytes = self._conn.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(LENGTH(data)), 0) FROM blocks"
        ).fetchone()
        self._update_attention()

        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, daemon=True,
                                        name=f"plexus-buffer-sync:{self.path.name}")
        self._thread.start()

    def __repr__(self) -> str:
        return f"SqliteBuffer({str(self.path)!r}, points={len(self)})"

    def set_block_limit(self, points: int) -> None:
        # Read by the next move (under _db_lock); an int store needs no lock.
        self.block_points = max(1, min(BLOCK_POINTS, self.max_points // 4, points))

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
            # Blocks are written once and read once, in id order: a big page cache
            # buys nothing, and the buffer must stay small on a Raspberry Pi.
            conn.execute("PRAGMA cache_size=-512")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not meta and tables != {"meta"}:
                raise _WrongSchema(f"a database of something else (tables {sorted(tables)})")
            if not meta:
                conn.execute("INSERT INTO meta VALUES ('schema', ?), ('uuid', ?), "
                             "('inbox_gen', '0'), ('inbox_offset', '0')",
                             (SCHEMA_VERSION, uuid.uuid4().hex[:12]))
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            schema = meta.get("schema")
            if schema not in (SCHEMA_VERSION, "2") or "uuid" not in meta:
                raise _WrongSchema(f"unexpected schema {schema!r}")
            # AUTOINCREMENT: ids are never reused, even after the table empties,
            # so batch keys (built from ids) never repeat and a receiver that
            # drops duplicate Idempotency-Keys never drops new data.
            conn.execute("CREATE TABLE IF NOT EXISTS blocks (id INTEGER PRIMARY KEY "
                         "AUTOINCREMENT, count INTEGER NOT NULL, raw_bytes INTEGER NOT NULL, "
                         "codec TEXT NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL)")
            # What could not be read back: kept for inspection, counted as lost,
            # never in the way of what comes after it.
            conn.execute("CREATE TABLE IF NOT EXISTS set_aside "
                         "(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, data BLOB)")
            # Losses by reason since the file was made (see the module docstring).
            conn.execute("CREATE TABLE IF NOT EXISTS counters "
                         "(name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            totals = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            columns = [r[1] for r in conn.execute("PRAGMA table_info(blocks)")]
            if columns != ["id", "count", "raw_bytes", "codec", "crc", "data"]:
                raise _WrongSchema(f"unexpected columns {columns}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        except BaseException:
            conn.close()
            raise
        self._uuid = meta["uuid"]
        self._schema = schema
        with self._counts_lock:
            self._totals = {k: int(v) for k, v in totals.items()}
        self._replay_gen, self._replay_from = _moved_position(meta)
        if meta.get("in_flight"):
            parts = meta["in_flight"].split("-")
            if len(parts) == 3:
                self._resume = (int(parts[0]), int(parts[1]), int(parts[2]))
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

    def _recover(self) -> int:
        """Store what earlier runs left behind as blocks; return the next segment number."""
        if self._schema == "2":
            self._convert_point_rows()
        gens = inbox.segment_gens(self.path)
        chain_broken = False
        recovered = 0
        for gen in gens:
            start = _unmoved_from(gen, (self._replay_gen, self._replay_from))
            if start is None:
                continue  # already in SQLite; deleted below
            path = inbox.segment_path(self.path, gen)
            try:
                if self._schema == "2":
                    tag, records, sealed, damaged = self._read_old_inbox(path, start)
                else:
                    seg = inbox.read_segment(path, gen, start)
                    tag, records, sealed, damaged = (seg.codec_tag or POINTS.tag, seg.records,
                                                     seg.sealed, seg.damaged_bytes)
            except OSError as exc:  # unreadable: set it aside, the buffer must come up
                aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(path, aside)
                log.warning("buffer inbox %s cannot be read (%s); moved it aside to %s",
                            path, exc, aside)
                chain_broken = True
                continue
            if chain_broken:
                if records:
                    self._count_lost("after a gap", len(records))
                    log.warning("%s: %d records follow a segment a power cut cut short; "
                                "they were discarded so that what is kept stays in order",
                                path, len(records))
                continue
            if damaged:
                self.torn_records += 1
                log.warning("%s: %d bytes after the last whole record are not records (a "
                            "write cut by a crash or power cut, or data the disk never "
                            "received) and were discarded", path, damaged)
            if records:
                self._insert_blocks(tag, records, (gen + 1, 0))
                recovered += len(records)
            # Every segment but the newest ends in its seal; one that does not lost
            # its tail to a power cut, and whatever came later must go with it.
            chain_broken = not sealed and gen != gens[-1]
        next_gen = max([*gens, self._replay_gen - 1]) + 1
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        self._set_position(next_gen, 0)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        stored = self._store_counts()
        conn.execute("COMMIT")
        self._forget_stored(stored)
        conn.execute("PRAGMA wal_checkpoint(FULL)")  # on disk before the inbox files go
        for gen in gens:
            inbox.segment_path(self.path, gen).unlink(missing_ok=True)
        self._schema = SCHEMA_VERSION
        if recovered:
            log.info("recovered %d points from the inbox of %s", recovered, self.path)
        return next_gen

    def _read_old_inbox(self, path: Path, start: int) -> tuple[str, list[bytes], bool, int]:
        """An inbox file of schema 2: records of (length, CRC of the payload, payload)."""
        blob = path.read_bytes()[start:]
        records, used = [], 0
        while used + 8 <= len(blob):
            length, crc = struct.unpack_from("<II", blob, used)
            stop = used + 8 + length
            if not 0 < length <= inbox.MAX_RECORD or stop > len(blob) \
                    or zlib.crc32(blob[used + 8:stop]) != crc:
                break
            records.append(blob[used + 8:stop])
            used = stop
        return POINTS.tag, records, True, len(blob) - used

    def _convert_point_rows(self) -> None:
        """Schema 2 kept one row per point (the JSON of its tuple): make blocks."""
        conn = self._conn
        if "points" not in {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}:
            return
        last = 0
        while True:
            rows = conn.execute("SELECT id, data FROM points WHERE id > ? ORDER BY id LIMIT ?",
                                (last, self.block_points)).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            self._insert_blocks(POINTS.tag, [bytes(r[1]) for r in rows], None)
        conn.execute("DROP TABLE points")
        self._resume = None  # row ids of the old table mean nothing now
        log.info("converted the buffer %s to schema %s", self.path, SCHEMA_VERSION)

    # Blocks ------------------------------------------------------------------
    def _make_blocks(self, codec: PointCodec, records: list[bytes]) -> list[tuple[Any, ...]]:
        rows = []
        start, n = 0, len(records)
        while start < n:
            stop = min(n, start + self.block_points)
            # Big values (events up to 4 KB) can make a block too large for one
            # request: halve it until it fits. Counting bytes is C-speed (map/sum).
            while stop - start > 1 and sum(map(len, records[start:stop])) >= BLOCK_RAW_BYTES:
                stop = start + (stop - start) // 2
            raw = codec.block(records[start:stop])
            data = compress(raw)
            rows.append((stop - start, len(raw), codec.tag, zlib.crc32(data), data))
            start = stop
        return rows

    def _insert_blocks(self, tag: str, records: list[bytes],
                       position: tuple[int, int] | None) -> None:
        """Store records as blocks (and the inbox position reached) in one transaction."""
        rows = self._make_blocks(codec_for_tag(tag) if tag != self.codec.tag else self.codec,
                                 records)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO blocks (count, raw_bytes, codec, crc, data) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
            if position is not None:
                self._set_position(*position)
            stored = self._store_counts()  # points dropped from memory meanwhile
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                conn.execute("ROLLBACK")
            raise
        self._forget_stored(stored)
        self._block_points += len(records)
        self._block_bytes += sum(len(r[4]) for r in rows)

    # Losses, stored with the points ---------------------------------------------
    def _note(self, key: str, n: int) -> None:
        """Count ``n`` points lost for ``key``; stored by the next transaction."""
        with self._counts_lock:
            self._totals[key] = self._totals.get(key, 0) + n
            self._unsaved[key] = self._unsaved.get(key, 0) + n

    def _store_counts(self) -> dict[str, int]:
        """Add the losses not stored yet. Part of the caller's transaction; pass
        the result to :meth:`_forget_stored` once it has committed."""
        with self._counts_lock:
            todo = {k: v for k, v in self._unsaved.items() if v}
        if todo:
            self._conn.executemany(_ADD_COUNT, list(todo.items()))
        return todo

    def _forget_stored(self, stored: dict[str, int]) -> None:
        with self._counts_lock:
            for key, n in stored.items():
                self._unsaved[key] -= n

    def _store_counts_now(self) -> None:
        """Store the losses not stored yet, in a transaction of their own."""
        if not any(self._unsaved.values()):
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            stored = self._store_counts()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._warn(logging.WARNING, "could not store the loss counts of %s: %s",
                       self.path, exc)
            return
        self._forget_stored(stored)

    def count_rejected(self, n: int) -> None:
        # Stored by the acknowledgement that follows: a crash before it sends the
        # batch again, and the sink refuses (and we count) the points again.
        super().count_rejected(n)
        self._note("rejected", n)

    def loss_counts(self) -> dict[str, int]:
        with self._counts_lock:
            totals = dict(self._totals)
        return {"buffer_full": totals.pop("buffer_full", 0),
                "rejected": totals.pop("rejected", 0), **totals}

    def _set_position(self, gen: int, offset: int) -> None:
        """Record how far the inbox is in SQLite. Part of the caller's transaction."""
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_gen'", (str(gen),))
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'inbox_offset'", (str(offset),))

    # Producer side ------------------------------------------------------------
    def set_codec(self, codec: PointCodec) -> None:
        with self._db_lock:
            if self._pending:
                self._move()  # records already put keep the codec they were written with
            with self._lock:
                super().set_codec(codec)
                self._record = codec.record
                if self._segment is not None and self._segment.codec_tag != codec.tag:
                    self._switch_segment()  # a segment's records all share one codec

    def put(self, point: Point) -> None:
        record = self._record(point)
        n = len(record)
        framed = _pack_header(_MAGIC, n, _crc32(record)) + record  # inbox.frame, inlined
        n += _HEADER_SIZE
        with self._lock:
            seg = self._segment
            if seg is not None and seg.pos + n + _SEAL_ROOM <= seg.size and not self._spilling:
                pos = seg.pos
                seg.map[pos:pos + n] = framed
                seg.pos = pos + n
                seg.dirty = True
                self._pending.append(record)
                self._pending_bytes += n
            else:
                self._append(framed, record)
            if len(self._pending) >= self._attention:
                self._attend(1)

    def put_many(self, points: list[Point]) -> None:
        if not points:
            return  # nothing added: no wake-up owed to anyone
        encode = self._record
        records = [encode(p) for p in points]
        framed = b"".join([inbox.frame(r) for r in records])
        with self._lock:
            if self._full(len(records)) and self._should_wait():
                self._wait_for_room(len(records))
            seg = self._segment
            if seg is not None and seg.room(len(framed)) and not self._spilling:
                seg.map[seg.pos:seg.pos + len(framed)] = framed
                seg.pos += len(framed)
                seg.dirty = True
                self._pending += records
                self._pending_bytes += len(framed)
            else:  # across a segment's end, or the first write: one at a time
                for record in records:
                    self._append(inbox.frame(record), record)
            if len(self._pending) >= self._attention:
                self._attend(len(records))

    def _update_attention(self) -> None:
        """How many pending records send put() down its slow path: enough to wake
        the uploader, reach a cap, or hold too much in memory; or the very next one."""
        if self._wake_next:
            self._attention = 0
            return
        stored = self._block_points + self._in_flight_memory
        # Once woken, the uploader needs no second call until it has taken a batch.
        wake = _MOVE_AT_RECORDS if self._signalled else self._wake_at - stored
        self._attention = max(0, min(wake, self.max_points - stored, _MOVE_AT_RECORDS))

    def _append(self, framed: bytes, record: bytes) -> None:
        """Copy one framed record into a segment with room. Holds _lock."""
        seg = self._segment
        if seg is None or not seg.room(len(framed)) or self._spilling:
            seg = self._switch_segment()
        if seg is None:
            self._spill(record)
            return
        pos = seg.pos
        seg.map[pos:pos + len(framed)] = framed
        seg.pos = pos + len(framed)
        seg.dirty = True
        self._pending.append(record)
        self._pending_bytes += len(framed)

    def _switch_segment(self) -> inbox.Segment | None:
        """Seal the current segment and start the next one. Holds _lock.

        Returns None when no segment can be made (disk full): points are then
        kept in memory until the sync thread manages to make one.
        """
        new, self._spare = self._spare, None
        if new is not None and new.codec_tag != self.codec.tag:
            new.close()
            new.path.unlink(missing_ok=True)
            new = None
        if new is None:
            if self._spilling:
                return None  # the sync thread retries making a segment every round
            try:
                new = self._new_segment()
            except OSError as exc:
                self._start_spilling(exc)
                return None
        old = self._segment
        if old is not None:
            old.seal()
            self._sealed.append(old)  # fsynced before the new one, every round
        self._segment = new
        self._half_kicked = False
        if self._spilling:
            self._spilling = False
            log.warning("the buffer %s is writable again: points go to disk", self.path)
        return new

    def _new_segment(self) -> inbox.Segment:
        # The number is taken before the file exists, so the sync thread making a
        # spare and a producer making one inline never pick the same.
        gen, self._gen = self._gen, self._gen + 1
        return inbox.Segment(self.path, gen, self.codec.tag)

    def _start_spilling(self, exc: OSError) -> None:
        if not self._spilling:
            self._spilling = True
            log.warning("cannot make a buffer file beside %s (%s): keeping points in memory "
                        "(at most %d) until the disk has room again", self.path, exc,
                        _SPILL_MAX_POINTS)

    def _spill(self, record: bytes) -> None:
        self._pending.append(record)
        self._pending_bytes += len(record) + inbox.HEADER_SIZE
        self.spilled += 1
        self._spilled_now += 1
        if self._spilled_now > _SPILL_MAX_POINTS:  # memory stays bounded too
            self._drop_pending(self._spilled_now - _SPILL_MAX_POINTS)

    def _drop_pending(self, n: int) -> None:
        dropped = self._pending[:n]
        del self._pending[:n]
        self._pending_bytes -= sum(len(r) + inbox.HEADER_SIZE for r in dropped)
        self._spilled_now = max(0, self._spilled_now - len(dropped))
        self._note("buffer_full", len(dropped))  # stored by the next transaction
        self._count_drops(len(dropped))

    def _full(self, adding: int = 0) -> bool:
        size = len(self)
        return (size + adding > self.max_points or self._bytes() > self.max_bytes) and size > 0

    def _bytes(self) -> int:
        return self._block_bytes + self._pending_bytes

    def _attend(self, added: int) -> None:
        """The slow path of put: room, memory, the uploader's wake-up. Holds _lock."""
        if self._full() and self._should_wait():
            self._wait_for_room()
        seg = self._segment
        if self._full() or len(self._pending) >= _MOVE_AT_RECORDS or (
                seg is not None and not self._half_kicked and seg.pos > seg.size // 2):
            self._half_kicked = True
            self._kick.set()  # the sync thread moves, trims and makes the next segment
        if self._on_ready is not None and (self._wake_next or (
                not self._signalled and len(self) >= self._wake_at)):
            self._wake_next = False
            self._signalled = True
            self._on_ready()
        self._update_attention()

    def _wait_for_room(self, adding: int = 0) -> None:
        self.waited += 1
        if self._on_ready is not None:
            self._on_ready()  # a full buffer is worth an upload, whatever the batch size
        while self._full(adding) and self._should_wait():
            self._room.wait(0.25)

    def _notify_room(self) -> None:
        with self._lock:
            self._room.notify_all()

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        super().set_ready_callback(callback, at_points)
        with self._lock:
            self._update_attention()

    def wake_on_next_put(self) -> None:
        with self._lock:
            self._wake_next = True
            self._update_attention()

    # Moving the inbox into SQLite ----------------------------------------------
    def _move(self) -> None:
        """Store the pending records as blocks. Caller holds ``_db_lock``."""
        with self._lock:
            records, self._pending = self._pending, []
            self._moving = len(records)  # still counted by len() while on their way
            pending_bytes, self._pending_bytes = self._pending_bytes, 0
            spilled, self._spilled_now = self._spilled_now, 0
            seg = self._segment
            # Everything written so far: to the end of the current segment.
            position = (seg.gen, seg.pos) if seg is not None else (self._gen, 0)
            finished = list(self._sealed)
        if not records:
            return
        try:
            self._insert_blocks(self.codec.tag, records, position)
        except BaseException:
            with self._lock:  # back in front, in order
                self._pending[:0] = records
                self._pending_bytes += pending_bytes
                self._spilled_now += spilled
                self._moving = 0
            raise
        self._moving = 0  # _insert_blocks counted them in _block_points
        # Sealed segments hold nothing SQLite does not now: delete them once a
        # checkpoint has made the move durable.
        self._retired += [s for s in finished if s not in self._retired]
        with self._lock:
            self._update_attention()

    def _fsync_inbox(self) -> None:
        """fsync what producers wrote, oldest segment first: durable in order."""
        with self._lock:
            segments = [*self._sealed, *([self._segment] if self._segment else [])]
        for seg in segments:
            if seg.dirty:
                seg.fsync()

    def _prepare_spare(self) -> None:
        """Make the next segment ahead of time, so a producer's switch is cheap."""
        with self._lock:
            seg = self._segment
            wanted = self._spare is None and (self._spilling or (
                seg is not None and seg.pos > seg.size // 2))
            if not wanted:
                return
            gen, self._gen = self._gen, self._gen + 1
            tag = self.codec.tag
        try:
            spare = inbox.Segment(self.path, gen, tag)
        except OSError as exc:
            # Producers go on filling the current segment; they spill to memory
            # only if they need a new one and cannot make it either.
            self._warn(logging.WARNING, "cannot make the next inbox segment of %s yet: %s",
                       self.path, exc)
            return
        with self._lock:
            if self._spare is None and spare.codec_tag == self.codec.tag:
                self._spare = spare
                if self._spilling:
                    self._switch_segment()
                return
        spare.close()
        spare.path.unlink(missing_ok=True)

    def sync(self) -> None:
        """Make everything buffered so far durable: fsync, move, trim, checkpoint."""
        with self._db_lock:
            if self._closed:
                return
            self._fsync_inbox()
            self._move_then_trim()
            self._retry_deletes()
            self._store_counts_now()  # losses no other transaction carried yet
            if self._checkpoint("PASSIVE"):  # what retired segments held is on disk
                self._delete_retired()
        self._prepare_spare()

    def _checkpoint(self, mode: str) -> bool:
        """Checkpoint the WAL; True when every frame reached the database file, which
        the checkpoint fsyncs. Only then may inbox segments that SQLite holds go: with
        ``synchronous=NORMAL`` a commit is durable at the checkpoint, not before. A
        reader on an older snapshot (``plexus-gateway buffer``, say) stops a checkpoint
        short; FULL and TRUNCATE then say busy, PASSIVE only copies fewer frames."""
        busy, frames, copied = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return not busy and copied == frames

    def _delete_retired(self) -> None:
        retired, self._retired = self._retired, []
        with self._lock:
            self._sealed = [s for s in self._sealed if s not in retired]
        for seg in retired:
            seg.close()
            seg.path.unlink(missing_ok=True)

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

    # Dropping --------------------------------------------------------------------
    def _move_then_trim(self) -> None:
        """Move the inbox into SQLite, then drop what is beyond the caps. The caps
        hold even when SQLite refuses the move (a full disk): the trim still runs,
        and drops the oldest records waiting in memory if it must."""
        try:
            self._move()
        finally:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest whole blocks beyond the caps. Caller holds ``_db_lock``."""
        if not self._full() or self._should_wait():
            return
        taken = self._taken_ids()
        doomed, points, size = [], 0, 0
        for row_id, count, nbytes in self._conn.execute(
                "SELECT id, count, LENGTH(data) FROM blocks ORDER BY id"):
            if row_id in taken:
                continue
            if (len(self) - points <= self.max_points
                    and self._bytes() - size <= self.max_bytes):
                break
            doomed.append(row_id)
            points += count
            size += nbytes
        if doomed:
            self._note("buffer_full", points)  # stored with the delete
            try:
                self._delete_blocks(doomed)
            except BaseException:
                self._note("buffer_full", -points)
                raise
            self._block_points -= points
            self._block_bytes -= size
            self._count_drops(points)
        if self._full() and self._pending:
            # Still over while SQLite takes nothing (a full disk): the oldest records
            # waiting in memory go. Their inbox copy is replayed only after a crash.
            with self._lock:
                over_points = len(self) - self.max_points
                over_bytes = self._bytes() - self.max_bytes
                n = 0
                while n < len(self._pending) and (n < over_points or over_bytes > 0):
                    over_bytes -= len(self._pending[n]) + inbox.HEADER_SIZE
                    n += 1
                self._drop_pending(n)

    def _taken_ids(self) -> set[int]:
        ids = set(self._undeleted)
        if isinstance(self._in_flight, list):
            ids.update(self._in_flight)
        return ids

    def _delete_blocks(self, ids: list[int]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in ids])
            stored = self._store_counts()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._forget_stored(stored)

    def _retry_deletes(self) -> None:
        if self._undeleted:
            self._delete_blocks(self._undeleted)
            self._undeleted.clear()

    def _count_lost(self, reason: str, n: int) -> None:
        self.lost[reason] = self.lost.get(reason, 0) + n
        self._note(_LOSS_KEYS[reason], n)

    # Uploader side -------------------------------------------------------------
    def take(self, max_points: int, newest: bool = False) -> Batch | None:
        with self._db_lock:
            if self._in_flight is not None:
                raise RuntimeError("SqliteBuffer holds one batch in flight at a time")
            moved = True
            try:
                self._move_then_trim()  # never put points beyond the cap into flight
            except (sqlite3.Error, OSError) as exc:
                moved = False
                self._warn(logging.WARNING, "moving the inbox of %s failed: %s", self.path, exc)
            limit = max(1, min(max_points, in_flight_limit(self.max_points)))
            batch = self._take_blocks(limit, newest)
            if batch is None and not moved:
                batch = self._take_pending(limit)
            with self._lock:
                self._signalled = False
                # After the take: records sent from memory left the pending list but
                # still count towards the uploader's next wake-up.
                self._update_attention()
            return batch

    def _take_blocks(self, limit: int, newest: bool) -> Batch | None:
        rows = None
        if self._resume is not None:
            # The batch in flight when the last run ended (or the last one given
            # back) goes first, exactly as it was, so it keeps its Idempotency-Key
            # and a receiver can drop a repeat. If any block of it is gone, it is
            # a different batch now and gets a new key.
            first, last, count = self._resume
            self._resume = None
            rows = self._conn.execute(
                "SELECT id, count, raw_bytes, codec FROM blocks WHERE id BETWEEN ? AND ? "
                "ORDER BY id", (first, last)).fetchall()
            if sum(r[1] for r in rows) != count or (rows and rows[0][0] != first):
                rows = None
        if not rows:
            rows = self._choose_blocks(limit, newest)
        while rows:
            batch = self._load(rows)
            if batch is not None:
                return batch
            rows = self._choose_blocks(limit, newest)  # what failed was set aside
        return None

    def _choose_blocks(self, limit: int, newest: bool) -> list[tuple[int, int, int, str]]:
        taken = self._taken_ids()
        order = "DESC" if newest else "ASC"
        chosen: list[tuple[int, int, int, str]] = []
        points = raw = 0
        for row in self._conn.execute(
                f"SELECT id, count, raw_bytes, codec FROM blocks ORDER BY id {order}"):
            if row[0] in taken:
                continue
            if chosen and (points + row[1] > limit or raw + row[2] > _BATCH_RAW_BYTES
                           or row[3] != chosen[0][3]):
                break
            chosen.append(row)
            points += row[1]
            raw += row[2]
        if newest:
            chosen.reverse()
        return chosen

    def _load(self, rows: list[tuple[int, int, int, str]]) -> Batch | None:
        """Read and check the chosen blocks, then record them in flight.

        Blocks that fail their check are set aside and None is returned.
        """
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        data = {i: (crc, bytes(blob)) for i, crc, blob in self._conn.execute(
            f"SELECT id, crc, data FROM blocks WHERE id IN ({marks})", ids)}
        bad = [(i, data[i][1], "CRC mismatch") for i in ids
               if i in data and zlib.crc32(data[i][1]) != data[i][0]]
        tag = rows[0][3]
        try:
            codec = self.codec if tag == self.codec.tag else codec_for_tag(tag)
        except ValueError as exc:
            bad = [(i, data[i][1], str(exc)) for i in ids if i in data]
        if bad:
            self._set_aside(bad, {r[0]: r[1] for r in rows})
            return None
        count = sum(r[1] for r in rows)
        if len(rows) == 1:
            body = data[ids[0]][1]
            raw_cache: list[bytes] = []

            def decode() -> list[Point]:
                if not raw_cache:
                    raw_cache.append(decompress(body))
                return codec.points(raw_cache[0])
        else:
            try:
                raw = codec.block([codec.body(decompress(data[i][1])) for i in ids])
            except ValueError as exc:
                self._set_aside([(i, data[i][1], str(exc)) for i in ids],
                                {r[0]: r[1] for r in rows})
                return None
            body = compress(raw)

            def decode() -> list[Point]:
                return codec.points(raw)
        first, last = ids[0], ids[-1]
        self._in_flight = ids
        try:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('in_flight', ?)",
                               (f"{first}-{last}-{count}",))
        except sqlite3.Error as exc:  # only costs a possible duplicate after a crash
            log.debug("recording the batch in flight failed: %s", exc)
        size = sum(len(data[i][1]) for i in ids)
        return Batch(f"{self._uuid}-{first}-{last}-{count}", handle=("blocks", ids, count, size),
                     count=count, body=body, codec_tag=tag, decode=decode)

    def _set_aside(self, bad: list[tuple[int, bytes, str]], counts: dict[int, int]) -> None:
        conn = self._conn
        ids = [b[0] for b in bad]
        points = sum(counts[i] for i in ids)  # every id is one of the chosen rows
        self._count_lost("unreadable", points)  # stored with the move
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO set_aside (id, reason, data) VALUES (?, ?, ?)",
                             [(i, f"unreadable block: {reason}"[:200], data)
                              for i, data, reason in bad])
            conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in ids])
            stored = self._store_counts()
            conn.execute("COMMIT")
            self._forget_stored(stored)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._undeleted += ids  # still skipped in this run
            log.warning("could not set aside unreadable blocks of %s: %s", self.path, exc)
        self._block_points -= points
        self._block_bytes -= sum(len(b[1]) for b in bad)
        log.error("%d points in %s could not be read back; their blocks were set aside "
                  "(table set_aside, ids %s) and counted as lost; delivery goes on",
                  points, self.path, ids)

    def _take_pending(self, limit: int) -> Batch | None:
        """SQLite cannot take more (a full disk): send records straight from memory."""
        with self._lock:
            records = self._pending[:min(limit, self.block_points)]
            del self._pending[:len(records)]
            size = sum(len(r) + inbox.HEADER_SIZE for r in records)
            self._pending_bytes -= size
        if not records:
            return None
        codec = self.codec
        raw = codec.block(records)
        self._in_flight = ("pending", records, size)
        self._in_flight_memory = len(records)
        return Batch(f"{self._uuid}-mem-{uuid.uuid4().hex[:8]}", handle=self._in_flight,
                     count=len(records), body=compress(raw), codec_tag=codec.tag,
                     decode=lambda: codec.points(raw))

    def ack(self, batch: Batch) -> None:
        kind = batch.handle[0]
        with self._db_lock:
            self._in_flight = None
            if kind == "pending":
                # Sent straight from memory: the next move records an inbox
                # position past these records.
                self._in_flight_memory = 0
            else:
                _, ids, count, size = batch.handle
                conn = self._conn
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in ids])
                    conn.execute("DELETE FROM meta WHERE key = 'in_flight'")
                    stored = self._store_counts()  # the rejections of this batch
                    conn.execute("COMMIT")
                    self._forget_stored(stored)
                except sqlite3.Error as exc:
                    # A full disk can refuse even a DELETE (the WAL must grow). The
                    # points are delivered: skip them from now on, delete them later.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    self._undeleted += ids
                    log.warning("could not delete delivered points from %s (%s); will retry",
                                self.path, exc)
                self._block_points -= count
                self._block_bytes -= size
            with self._lock:
                self._update_attention()
                self._room.notify_all()
        if len(self) <= self.max_points // 2:
            self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        # The record of the batch in flight stays: its outcome may be unknown (a
        # timed-out request), so it is sent again first, same key, while intact.
        with self._db_lock:
            self._in_flight = None
            handle = batch.handle
            if handle[0] == "pending":
                with self._lock:
                    self._pending[:0] = handle[1]
                    self._pending_bytes += handle[2]
                    self._in_flight_memory = 0
                    self._update_attention()
                return
            ids = handle[1]
            self._resume = (ids[0], ids[-1], handle[2])
            try:
                self._trim()  # given back, its blocks can be dropped like any waiting ones
            except (sqlite3.Error, OSError) as exc:
                self._warn(logging.WARNING, "trimming %s failed: %s", self.path, exc)

    def __len__(self) -> int:
        return self._block_points + len(self._pending) + self._in_flight_memory + self._moving

    @property
    def stored_bytes(self) -> int:
        """Bytes the buffer holds: compressed blocks plus records not yet moved."""
        return self._bytes()

    def claim(self, owner: str) -> None:
        """Record ``owner`` (a sink's name) as whose points this file holds, unless
        one is recorded already: the gateway finds each sink's file by it, so
        reordering the rig's sinks cannot hand one sink's backlog to another."""
        with self._db_lock:
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('owner', ?)", (owner,))

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
            self._store_counts_now()
            checkpointed = False
            try:
                checkpointed = self._checkpoint("TRUNCATE")
                if checkpointed:
                    self._delete_retired()
            except sqlite3.Error as exc:
                log.warning("final checkpoint of %s failed: %s", self.path, exc)
            self._conn.close()
            with self._lock:
                segments = [s for s in (*self._sealed, self._segment, self._spare) if s]
                for seg in segments:
                    seg.close()
                if self._pending:
                    if self._spilled_now:
                        log.warning("%d points could not be written to %s (disk full) and "
                                    "are lost", self._spilled_now, self.path)
                elif checkpointed:
                    # Everything the segments held is in SQLite, checkpointed. Otherwise
                    # they stay: the next open skips what the recorded position says
                    # SQLite holds, and replays the rest if a power cut took the WAL.
                    for seg in segments:
                        seg.path.unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the lock


def _moved_position(meta: dict[str, str]) -> tuple[int, int]:
    """The inbox position recorded in a buffer's meta table: (segment, offset)
    up to which the inbox's records are in SQLite."""
    return int(meta.get("inbox_gen") or 0), int(meta.get("inbox_offset") or 0)


def _unmoved_from(gen: int, moved: tuple[int, int]) -> int | None:
    """Where the records of segment ``gen`` not yet in SQLite begin, given the
    position ``moved`` (:func:`_moved_position`); None when all of them are."""
    moved_gen, moved_offset = moved
    if gen < moved_gen:
        return None
    return moved_offset if gen == moved_gen else 0


def recorded_owner(path: str | os.PathLike[str]) -> str | None:
    """The sink a buffer file was claimed by (:meth:`SqliteBuffer.claim`); None when
    there is no such file, it predates owners, or it cannot be read."""
    p = Path(path).expanduser()
    if not p.exists():
        return None
    try:
        # sqlite3's default busy timeout (5 s) outlasts a writer's transaction.
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def buffer_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a persistent buffer without taking it over (for ``plexus-gateway buffer``)."""
    p = Path(path).expanduser()
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    stamps: list[int] = []  # the first and last of each part: the oldest and newest
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "blocks" in tables:
            count, first, last = conn.execute(
                "SELECT COALESCE(SUM(count), 0), MIN(id), MAX(id) FROM blocks").fetchone()
            edges = [conn.execute("SELECT codec, data FROM blocks WHERE id = ?", (i,)).fetchone()
                     for i in (first, last) if i is not None]
            stamps += [s for tag, data in edges for s in _block_stamps(tag, data)]
        else:  # an older schema, converted when a client opens it
            count = conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        losses = dict(conn.execute("SELECT name, value FROM counters").fetchall()) \
            if "counters" in tables else {}
        # How far the inbox is in SQLite: records before it are counted in the blocks.
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) \
            if "meta" in tables else {}
    finally:
        conn.close()
    moved = _moved_position(meta)
    size = sum(Path(f"{p}{s}").stat().st_size for s in ("", "-wal") if Path(f"{p}{s}").exists())
    pending = 0
    for gen in inbox.segment_gens(p):
        start = _unmoved_from(gen, moved)
        try:
            seg = inbox.read_segment(inbox.segment_path(p, gen), gen, start or 0)
        except OSError:
            continue
        size += seg.end
        if start is None:
            continue  # all in SQLite already, deleted after the next checkpoint
        pending += len(seg.records)
        if seg.codec_tag:
            codec = codec_for_tag(seg.codec_tag)
            stamps += [pt[2] for r in seg.records[:1] + seg.records[-1:]
                       for pt in _safe_points(codec, codec.block([r]))]
    return {"path": str(p), "points": count + pending,
            "oldest_ms": min(stamps) if stamps else None,
            "newest_ms": max(stamps) if stamps else None, "bytes": size,
            "losses": {k: int(v) for k, v in losses.items() if v}}


def _block_stamps(tag: str, data: bytes) -> list[int]:
    try:
        points = codec_for_tag(tag).points(decompress(data))
    except ValueError:
        return []
    return [p[2] for p in points[:1] + points[-1:]]


def _safe_points(codec: PointCodec, raw: bytes) -> list[Point]:
    try:
        return codec.points(raw)
    except ValueError:
        return []
