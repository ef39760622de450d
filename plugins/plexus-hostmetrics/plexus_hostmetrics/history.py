"""The ``history`` sink: keep the last hours of points in a local SQLite file.

For a dashboard or a shell on the vehicle itself ("what did the CPU do in the
last hour?") while the platform gets everything too. One row per point::

    points(source_id TEXT, metric TEXT, value REAL, timestamp_ms INTEGER, tags TEXT)

It shows the parts of the sink contract most sinks need:

- ``open()`` creates the file and its tables; if that fails (a folder that
  cannot be created) the gateway retries it with backoff while the other
  sinks deliver, and ``preflight()`` lets ``--check`` find it first;
- ``send(points, key)`` stores a batch in one transaction and records its
  ``key``: a batch sent again with the same key (its answer was lost, or the
  gateway was killed before the buffer heard of it) is not stored twice;
- values that are not numbers are *rejected* (``SendResult.rejected``): they
  are counted and dropped, never retried;
- a locked database (another process writing) raises ``RetryableSinkError``:
  the same batch comes back after a pause.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from plexus import (
    OptionsModel,
    Point,
    RetryableSinkError,
    SendResult,
    Sink,
    cannot_write,
    option,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    source_id TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    timestamp_ms INTEGER NOT NULL, tags TEXT);
CREATE INDEX IF NOT EXISTS points_by_time ON points (timestamp_ms);
CREATE TABLE IF NOT EXISTS batches (key TEXT PRIMARY KEY, stored_ms INTEGER NOT NULL);
"""


class HistoryOptions(OptionsModel):
    """Options of the ``history`` sink."""

    path: str = option(help="the SQLite file (relative to the rig file)", path=True)
    keep_hours: float = option(24.0, help="rows older than this many hours are deleted", gt=0)
    busy_timeout: float = option(
        2.0, help="seconds to wait for another writer before retrying the batch later", ge=0)


class HistorySink(Sink):
    """Keep the last ``keep_hours`` of numeric points in a local SQLite file."""

    type_name = "history"
    Options = HistoryOptions

    def __init__(self, options: HistoryOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.path = Path(options.path)
        self.source_id = ""
        self._db: sqlite3.Connection | None = None

    def preflight(self) -> list[str]:
        reason = cannot_write(self.path)
        return [reason] if reason else []

    def open(self, source_id: str) -> None:
        self.source_id = source_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # open() runs in the starting thread, send() in this sink's uploader thread.
        db = sqlite3.connect(self.path, timeout=self.options.busy_timeout,
                             check_same_thread=False, isolation_level=None)
        try:
            db.executescript(_SCHEMA)
        except sqlite3.Error:
            db.close()  # a failed open releases what it took: it will be called again
            raise
        self._db = db

    def send(self, points: list[Point], key: str) -> SendResult:
        assert self._db is not None, "open() first"
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[int, str]] = []
        for index, (metric, value, timestamp_ms, tags) in enumerate(points):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                rejected.append((index, f"not a number ({type(value).__name__})"))
                continue
            rows.append((self.source_id, metric, float(value), timestamp_ms,
                         json.dumps(tags, sort_keys=True) if tags else None))
        now_ms = int(time.time() * 1000)
        horizon = now_ms - int(self.options.keep_hours * 3_600_000)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen = self._db.execute("SELECT 1 FROM batches WHERE key = ?", (key,)).fetchone()
                if seen is None:  # not stored by an earlier attempt of this batch
                    self._db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", rows)
                    self._db.execute("INSERT INTO batches VALUES (?, ?)", (key, now_ms))
                self._db.execute("DELETE FROM points WHERE timestamp_ms < ?", (horizon,))
                self._db.execute("DELETE FROM batches WHERE stored_ms < ?", (horizon,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O error: try later
            raise RetryableSinkError(f"{self.path}: {exc}") from exc
        return SendResult(delivered=len(rows), rejected=rejected)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
