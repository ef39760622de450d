"""Helpers shared by the tests (import as tests.support)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from plexus.point import Point, make_point


def readings(receiver: Any) -> list[dict[str, Any]]:
    """What a receiver stored, less the gateway's own health points (plexus.agent.*),
    which plexus-gateway sends by default."""
    return [p for p in receiver.points if not p["metric"].startswith("plexus.agent.")]


class FakeClock:
    """A clock that stands still until a test moves ``now``: call it where code takes a
    clock function, or read ``monotonic()`` where it reads the time module."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class CollectingContext:
    """An AdapterContext that validates and stamps points like the pipeline and keeps them.

    Sessions nest as the pipeline's do (the innermost id wins, tags merge with
    the inner winning, ending one restores what was open before it, ending an
    unknown one changes nothing): tests/test_pipeline.py checks that this
    stand-in stamps exactly like a real :class:`~plexus.pipeline.Pipeline`.
    """

    def __init__(self) -> None:
        self.points: list[Point] = []
        self.sessions: list[tuple[str, str, dict[str, str] | None]] = []  # (begin|end, id, tags)
        self.session_tags: dict[str, str] | None = None
        self._open: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def emit(self, metric: str, value: Any, timestamp: float | None = None,
             tags: dict[str, str] | None = None) -> None:
        point = make_point(metric, value, timestamp, tags, self.session_tags)
        with self._lock:
            self.points.append(point)

    def begin_session(self, session_id: str, tags: dict[str, str] | None = None) -> None:
        self.sessions.append(("begin", session_id, tags))
        self._open.append((session_id, {**(tags or {}), "session_id": session_id}))
        self._restamp()

    def end_session(self, session_id: str) -> None:
        self.sessions.append(("end", session_id, None))
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == session_id:
                del self._open[i]
                break
        self._restamp()

    def _restamp(self) -> None:
        tags: dict[str, str] = {}
        for _sid, session_tags in self._open:
            tags.update(session_tags)
        self.session_tags = tags or None

    @property
    def current_session(self) -> str | None:
        return self._open[-1][0] if self._open else None

    def metrics(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        with self._lock:
            for metric, value, _ts, _tags in self.points:
                out.setdefault(metric, []).append(value)
        return out

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)


def require_binary(name: str) -> str:
    """Path of a binary the test needs: skipped locally, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.02) -> Any:
    """Call ``predicate`` every ``step`` seconds until it returns something true or
    ``timeout`` seconds have passed; return its last value (true on success)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class Refusing:
    """A buffer's SQLite connection that refuses the statements starting with
    ``refused`` (a failing or full disk); everything else goes to ``conn``."""

    def __init__(self, conn: sqlite3.Connection, refused: str,
                 error: str = "disk I/O error") -> None:
        self._conn, self._refused, self._error = conn, refused, error

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith(self._refused):
            raise sqlite3.OperationalError(self._error)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith(self._refused):
            raise sqlite3.OperationalError(self._error)
        return self._conn.executemany(sql, *args)


def refuse_moves(buf: Any) -> None:
    """SQLite takes nothing more (a full disk): every move of a persistent buffer's
    inbox fails at its first statement."""
    buf._conn = Refusing(buf._conn, "BEGIN IMMEDIATE", "database or disk is full")
