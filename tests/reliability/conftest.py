"""Shared switches and helpers of the reliability and security suite.

Heavier trial counts run with ``--slow`` (when ``tests/reliability`` is named
on the command line, so that pytest loads this conftest before parsing
options) or with the environment variable ``PLEXUS_SLOW_TESTS=1`` (works
however pytest is started, e.g. ``pytest tests``)::

    .venv/bin/python -m pytest tests/reliability -q
    .venv/bin/python -m pytest tests/reliability -q --slow
    PLEXUS_SLOW_TESTS=1 .venv/bin/python -m pytest tests -q

Measured figures (peak RSS, drain times, the power-loss window...) are
collected with :func:`record_figure` and printed in a "reliability figures"
section at the end of the run, so docs/reliability.md can quote them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

_FIGURES: list[tuple[str, str]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="reliability suite: run the heavy trial counts "
                          "(same as PLEXUS_SLOW_TESTS=1)")


def slow_enabled(config: pytest.Config | None = None) -> bool:
    if os.environ.get("PLEXUS_SLOW_TESTS", "").strip() not in ("", "0"):
        return True
    if config is not None:
        try:
            return bool(config.getoption("--slow"))
        except ValueError:
            return False
    return False


@pytest.fixture(scope="session")
def slow(pytestconfig: pytest.Config) -> bool:
    """True when the heavy trial counts were asked for."""
    return slow_enabled(pytestconfig)


def record_figure(name: str, value: Any) -> None:
    """Keep a measured figure for the summary at the end of the run."""
    _FIGURES.append((name, str(value)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, value in _FIGURES:
        terminalreporter.write_line(f"{name}: {value}")
