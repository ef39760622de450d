"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests.support import CollectingContext

pytest_plugins = ["plexus.pytest_plugin"]


@pytest.fixture
def collector() -> CollectingContext:
    """An AdapterContext that validates points like the pipeline and keeps them."""
    return CollectingContext()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME and no PLEXUS_* settings from the environment."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in ("PLEXUS_API_KEY", "PLEXUS_SOURCE_ID", "PLEXUS_GATEWAY_URL", "PLEXUS_CONFIG",
                 "PLEXUS_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return home


# --- randomness: every random choice a test depends on is seeded ---------------------------

# Hypothesis draws its examples from a seed derived from each test's name
# (derandomize), so a run is repeatable and a mutant is caught or missed the
# same way every time. To explore new examples locally:
#   .venv/bin/python -m pytest tests --hypothesis-profile=explore
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")


# --- skips: loud, and in CI only the ones on this list --------------------------------------

#: The only skips CI accepts, each with why it can happen on a correctly set up
#: machine (also in docs/testing.md). Everything a test needs is installed by
#: .ci/run, so any other skip there means a missing peer and fails the run.
ALLOWED_SKIPS: dict[str, str] = {
    "permission bits are POSIX": "the POSIX permission tests cannot run on Windows",
    "tmpfs mounts are Linux only": "the disk-full trial mounts a tmpfs, Linux only",
    "reads /proc/self/status": "the RSS trial reads /proc, Linux only",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _unexpected(reason: str) -> bool:
    return not any(allowed in reason for allowed in ALLOWED_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        if _unexpected(reason):
            report.outcome = "failed"
            report.longrepr = (f"skipped in CI, and the reason is not on the allow list "
                               f"(tests/conftest.py ALLOWED_SKIPS, docs/testing.md): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        reason = _skip_reason(report.longrepr)
        if _unexpected(reason):
            report.outcome = "failed"
            report.longrepr = (f"module skipped in CI, and the reason is not on the allow "
                               f"list (tests/conftest.py ALLOWED_SKIPS): {reason}")
