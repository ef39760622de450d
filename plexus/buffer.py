"""Buffers: the only hand-off between producer threads and an uploader.

A buffer holds validated points until a sink acknowledges them. The uploader
takes one batch at a time (``take``), and either acknowledges it (``ack``:
the points leave the buffer) or gives it back (``release``: they are sent
again later, first in line). ``len(buffer)`` counts every point not yet
acknowledged, the batch in flight included.

- :class:`MemoryBuffer`: a deque capped at ``max_points``; when full the
  oldest waiting point is dropped and counted. Lost on a crash.
- :class:`SqliteBuffer`: every point is committed to SQLite before ``put``
  returns, so it survives ``kill -9``; see its docstring for power loss.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from plexus.point import Point

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 10_000
DEFAULT_SQLITE_MAX_POINTS = 1_000_000


@dataclass
class Batch:
    """Points taken from a buffer, delivered together.

    ``key`` is stable for these exact points while they stay in flight (and,
    for the SQLite buffer, across restarts), so a retried request carries the
    same ``Idempotency-Key``.
    """

    key: str
    points: list[Point]
    handle: Any = field(default=None, repr=False)


class Buffer:
    """Common bookkeeping; subclasses implement the storage."""

    def __init__(self, max_points: int) -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        self.max_points = max_points
        self.dropped = 0  # points dropped because the buffer was full
        self._on_ready: Callable[[], None] | None = None
        self._wake_at = 1 << 62
        self._overflowing = False
        self._episode_drops = 0

    def set_ready_callback(self, callback: Callable[[], None], at_points: int) -> None:
        """Call ``callback`` (from a producer thread) once ``at_points`` are waiting."""
        self._on_ready = callback
        self._wake_at = at_points

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self._episode_drops += n
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "%s full (%d points): dropping the oldest points until the uploader catches up",
                type(self).__name__, self.max_points,
            )

    def _end_overflow_episode(self) -> None:
        # Called once the buffer has drained to half, so a sustained overload
        # is one episode (two log lines), not a line per batch.
        if self._overflowing:
            log.warning(
                "%s overflow ended: %d oldest points were dropped (%d in total since start)",
                type(self).__name__, self._episode_drops, self.dropped,
            )
            self._overflowing = False
            self._episode_drops = 0

    # Interface -----------------------------------------------------------
    def put(self, point: Point) -> None:
        raise NotImplementedError

    def put_many(self, points: list[Point]) -> None:
        raise NotImplementedError

    def take(self, max_points: int) -> Batch | None:
        raise NotImplementedError

    def ack(self, batch: Batch) -> None:
        raise NotImplementedError

    def release(self, batch: Batch) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; waiting points of a persistent buffer stay stored."""


class MemoryBuffer(Buffer):
    """An in-memory ring of points, dropping the oldest when full."""

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS) -> None:
        super().__init__(max_points)
        self._queue: deque[Point] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._batch_ids = itertools.count()
        self._nonce = uuid.uuid4().hex[:12]

    def put(self, point: Point) -> None:
        queue = self._queue
        with self._lock:
            if len(queue) + self._in_flight >= self.max_points:
                self._drop_oldest(1)
            queue.append(point)
            if len(queue) >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def put_many(self, points: list[Point]) -> None:
        with self._lock:
            overflow = len(self._queue) + self._in_flight + len(points) - self.max_points
            if overflow > 0:
                self._drop_oldest(overflow)
            self._queue.extend(points)
            if len(self._queue) >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def _drop_oldest(self, n: int) -> None:
        queue = self._queue
        n = min(n, len(queue)) if len(queue) else 0
        for _ in range(n):
            queue.popleft()
        if n:
            self._count_drops(n)

    def take(self, max_points: int) -> Batch | None:
        with self._lock:
            queue = self._queue
            n = min(max_points, len(queue))
            if n == 0:
                return None
            if n == len(queue):
                points = list(queue)
                queue.clear()
            else:
                points = [queue.popleft() for _ in range(n)]
            self._in_flight += n
        return Batch(f"{self._nonce}-{next(self._batch_ids)}", points)

    def ack(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight -= len(batch.points)
            if len(self._queue) + self._in_flight <= self.max_points // 2:
                self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight -= len(batch.points)
            self._queue.extendleft(reversed(batch.points))
            overflow = len(self._queue) - self.max_points
            if overflow > 0:  # cannot happen unless max_points shrank; stay bounded anyway
                for _ in range(overflow):
                    self._queue.popleft()
                self._count_drops(overflow)

    def __len__(self) -> int:
        return len(self._queue) + self._in_flight


_SCHEMA_VERSION = "1"


class SqliteBuffer(Buffer):
    """A persistent buffer in one SQLite file (WAL mode).

    Crash safety, as shipped by default:

    - ``kill -9`` of the process loses nothing: each ``put`` is a committed
      transaction before it returns, and committed pages live in the OS.
    - Power loss loses at most the last ``sync_interval`` seconds (default
      1 s): commits use ``synchronous=NORMAL`` (no fsync per point, which would
      cost milliseconds on an SD card) and a background thread checkpoints,
      and so fsyncs, the WAL every ``sync_interval``. SQLite's WAL keeps the
      file consistent whatever instant the power goes.
    - A file that cannot be opened as our buffer (truncated, garbage, wrong
      schema, unreadable) is moved aside as ``<name>.corrupt-<timestamp>`` and
      a fresh buffer starts, so the gateway always comes up.

    ``max_points`` caps the stored points; beyond it the oldest waiting ones
    are deleted and counted in ``dropped``.
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
        self._lock = threading.Lock()
        self._conn = self._open_or_replace()
        self._count = self._conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        self._in_flight: tuple[int, int, int] | None = None  # (first id, last id, count)
        self._closed = False
        self._stop_sync = threading.Event()
        self._sync_thread: threading.Thread | None = None
        if sync_interval > 0:
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name=f"plexus-sqlite-sync:{self.path.name}", daemon=True
            )
            self._sync_thread.start()

    # Opening -------------------------------------------------------------
    def _open_or_replace(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            return self._open()
        except (sqlite3.DatabaseError, OSError, _WrongSchema) as exc:
            aside = self._move_aside(exc)
            log.warning(
                "buffer file %s could not be used (%s); moved it aside to %s and started "
                "a fresh buffer", self.path, exc, aside,
            )
            return self._open()

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            # Create it ourselves so the mode is 0600 from the first byte.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif not os.access(self.path, os.R_OK | os.W_OK):
            raise PermissionError(f"no read/write permission on {self.path}")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (and their fsyncs) run in our sync thread, never in put().
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"
            )
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not rows:
                conn.execute(
                    "INSERT INTO meta VALUES ('schema', ?), ('uuid', ?)",
                    (_SCHEMA_VERSION, uuid.uuid4().hex[:12]),
                )
                rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if rows.get("schema") != _SCHEMA_VERSION or "uuid" not in rows:
                raise _WrongSchema(f"unexpected schema {rows.get('schema')!r}")
            columns = [r[1] for r in conn.execute("PRAGMA table_info(points)")]
            if columns != ["id", "data"]:
                raise _WrongSchema(f"unexpected columns {columns}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        except BaseException:
            conn.close()
            raise
        self._uuid = rows["uuid"]
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.chmod(side, 0o600)
        return conn

    def _move_aside(self, exc: BaseException) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                try:
                    shutil.move(src, f"{aside}{suffix}")
                except OSError:
                    src.unlink(missing_ok=True)
        return aside

    # Producer side -------------------------------------------------------
    def put(self, point: Point) -> None:
        data = orjson.dumps(point)
        with self._lock:
            self._conn.execute("INSERT INTO points (data) VALUES (?)", (data,))
            self._count += 1
            if self._count > self.max_points:
                self._drop_oldest(self._count - self.max_points)
            if self._count >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def put_many(self, points: list[Point]) -> None:
        rows = [(orjson.dumps(p),) for p in points]
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO points (data) VALUES (?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._count += len(rows)
            if self._count > self.max_points:
                self._drop_oldest(self._count - self.max_points)
            if self._count >= self._wake_at and self._on_ready is not None:
                self._on_ready()

    def _drop_oldest(self, n: int) -> None:
        # Delete a little more than needed so a full buffer does not pay a
        # DELETE on every put.
        n = max(n, self.max_points // 100)
        after = self._in_flight[1] if self._in_flight else 0
        cur = self._conn.execute(
            "DELETE FROM points WHERE id IN "
            "(SELECT id FROM points WHERE id > ? ORDER BY id LIMIT ?)",
            (after, n),
        )
        if cur.rowcount > 0:
            self._count -= cur.rowcount
            self._count_drops(cur.rowcount)

    # Uploader side -------------------------------------------------------
    def take(self, max_points: int) -> Batch | None:
        with self._lock:
            if self._in_flight is not None:
                raise RuntimeError("SqliteBuffer holds one batch in flight at a time")
            rows = self._conn.execute(
                "SELECT id, data FROM points ORDER BY id LIMIT ?", (max_points,)
            ).fetchall()
            if not rows:
                return None
            first, last = rows[0][0], rows[-1][0]
            self._in_flight = (first, last, len(rows))
        loads = orjson.loads
        points: list[Point] = [tuple(loads(data)) for _, data in rows]  # type: ignore[misc]
        return Batch(f"{self._uuid}-{first}-{last}-{len(rows)}", points, (first, last))

    def ack(self, batch: Batch) -> None:
        first, last = batch.handle
        with self._lock:
            cur = self._conn.execute(
                "DELETE FROM points WHERE id BETWEEN ? AND ?", (first, last)
            )
            self._count -= cur.rowcount
            self._in_flight = None
            if self._count <= self.max_points // 2:
                self._end_overflow_episode()

    def release(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight = None

    def __len__(self) -> int:
        return self._count

    # Durability ----------------------------------------------------------
    def sync(self) -> None:
        """fsync what is committed so far (a WAL checkpoint).

        Runs on its own connection so producers keep writing during the fsync.
        """
        if self._closed:
            return
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _sync_loop(self) -> None:
        while not self._stop_sync.wait(self.sync_interval):
            try:
                self.sync()
            except sqlite3.Error as exc:  # keep going: the next sync may succeed
                log.warning("buffer sync of %s failed: %s", self.path, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._stop_sync.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
        with self._lock:
            self._closed = True
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("final checkpoint of %s failed: %s", self.path, exc)
            self._conn.close()


class _WrongSchema(Exception):
    pass


def buffer_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a persistent buffer file without taking it over (for the CLI)."""
    p = Path(path).expanduser()
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        count, first, last = conn.execute(
            "SELECT COUNT(*), MIN(id), MAX(id) FROM points"
        ).fetchone()
        oldest = newest = None
        if count:
            oldest = orjson.loads(
                conn.execute("SELECT data FROM points WHERE id = ?", (first,)).fetchone()[0]
            )[2]
            newest = orjson.loads(
                conn.execute("SELECT data FROM points WHERE id = ?", (last,)).fetchone()[0]
            )[2]
    finally:
        conn.close()
    size = sum(
        Path(f"{p}{s}").stat().st_size for s in ("", "-wal") if Path(f"{p}{s}").exists()
    )
    return {"path": str(p), "points": count, "oldest_ms": oldest, "newest_ms": newest,
            "bytes": size}


def iter_chunks(points: list[Point], size: int) -> Iterable[list[Point]]:
    for i in range(0, len(points), size):
        yield points[i : i + size]
