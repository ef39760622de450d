"""The command center on its own, without a link: frames handed to it, the statuses
it sends collected as they go. What is checked here is bookkeeping a dashboard
reads: runs delivered twice, the counts, and what the log says."""

from __future__ import annotations

import logging
import threading

from plexus import commands
from plexus.commands import CommandCenter, declare


class Attached:
    """A center attached to a collecting ``send``, as the link attaches it."""

    def __init__(self, center: CommandCenter) -> None:
        self.center = center
        self.sent: list[dict] = []
        self._cond = threading.Condition()
        center.attach(self._send, {}, lambda: None)

    def _send(self, frame: dict) -> bool:
        with self._cond:
            self.sent.append(dict(frame))
            self._cond.notify_all()
        return True

    def final(self, run_id: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
        def finals() -> list[dict]:
            return [f for f in self.sent if f.get("run_id") == run_id
                    and f.get("state") in ("succeeded", "failed")]

        with self._cond:
            self._cond.wait_for(lambda: len(finals()) >= count, timeout)
            return finals()


def run_frame(run_id: str, command: str | None = "inc") -> dict:
    frame = {"type": "command_run", "run_id": run_id, "params": {}, "ttl_ms": 30000}
    if command is not None:
        frame["command"] = command
    return frame


def test_a_run_delivered_again_is_answered_from_memory_counted_and_logged(caplog):
    center = CommandCenter()
    calls: list[str] = []
    center.add(declare("inc", lambda run: calls.append(run.id) or len(calls)))
    link = Attached(center)
    caplog.set_level(logging.INFO, logger="plexus.commands")
    center.handle(run_frame("r1"))
    assert link.final("r1")[0]["result"] == {"value": 1}
    center.handle(run_frame("r1"))
    center.handle(run_frame("r1", command=None))
    again = link.final("r1", count=3)
    assert [f["seq"] for f in again] == [3, 4, 5] and calls == ["r1"]
    assert center.counts["duplicates"] == 2 and center.counts["runs"] == 1
    assert "command run r1 (inc) delivered again; not run twice" in caplog.messages
    assert "command run r1 (?) delivered again; not run twice" in caplog.messages


def test_a_run_delivered_again_after_it_was_forgotten_fails_as_a_duplicate(monkeypatch):
    monkeypatch.setattr(commands, "REMEMBERED_RUNS", 1)
    center = CommandCenter()
    center.add(declare("inc", lambda run: None))
    link = Attached(center)
    center.handle(run_frame("r1"))
    link.final("r1")
    center.handle(run_frame("r2"))  # r1's status is forgotten, its id is not
    link.final("r2")
    center.handle(run_frame("r1"))
    ghost = link.final("r1", count=2)[-1]
    assert (ghost["state"], ghost["error_code"], ghost["error_message"]) == (
        "failed", "duplicate", "this run was already received and is no longer remembered")
    assert ghost["seq"] == 1 and center.counts["duplicates"] == 1

