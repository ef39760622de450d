"""Helpers for the reliability suite (import as tests.reliability.support)."""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from plexus import Plexus, RetryPolicy
from tests.support import wait_until as wait_until  # re-exported for the tests here

KEY = "plx_test"
FAST_RETRY = RetryPolicy(retries=3, base=0.01, max_delay=0.05)
REPO = Path(__file__).resolve().parents[2]


def make_client(receiver: Any, **kwargs: Any) -> Plexus:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("source_id", "rig-01")
    kwargs.setdefault("gateway_url", receiver.url)
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("flush_interval", 0.05)
    return Plexus(**kwargs)


def values(receiver: Any, metric: str | None = None) -> list[Any]:
    """Values the receiver stored (duplicates dropped by Idempotency-Key are not stored)."""
    return [p["value"] for p in receiver.points if metric is None or p["metric"] == metric]


def duplicates_stored(vals: Iterable[Any]) -> dict[Any, int]:
    """Values stored more than once, with how many times."""
    return {v: n for v, n in collections.Counter(vals).items() if n > 1}


def unknown_outcome_keys(receiver: Any) -> set[str]:
    """Idempotency keys of requests whose outcome the client could not know.

    A reset after storing (the client sees a connection error for stored
    data) and a delayed answer (the client times out while the receiver
    still processes and stores the request).
    """
    keys = set()
    for r in receiver.requests:
        fault = r.fault or ""
        if r.idempotency_key and ("reset_after_store" in fault or "delay" in fault):
            keys.add(r.idempotency_key)
    return keys


def assert_duplicates_only_from_unknown_outcomes(receiver: Any) -> int:
    """Every request the receiver answered from its key memory repeats a request whose
    outcome was unknown to the client; returns how many such duplicates there were."""
    unknown = unknown_outcome_keys(receiver)
    dupes = [r for r in receiver.requests if r.duplicate]
    for r in dupes:
        assert r.idempotency_key in unknown, (
            f"request with key {r.idempotency_key} was a duplicate although no earlier "
            f"request with that key had an unknown outcome")
    return len(dupes)


class LogCapture(logging.Handler):
    """Collects formatted records of every logger (DEBUG and up) while installed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must not break the test
            self.lines.append(repr(record.__dict__))

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def files_under(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            out += [Path(dirpath) / n for n in names]
    return out


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this one, with the repo importable."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env
