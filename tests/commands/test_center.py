"""The command center on its own, without a link: frames handed to it, the statuses
it sends collected as they go. What is checked here is bookkeeping a dashboard
reads: runs delivered twice, the counts, and what the log says."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from plexus import commands
from plexus.commands import CommandCenter, declare
from tests.support import FakeClock, wait_until


class Attached:
    """A center attached to a collecting ``send``, as the link attaches it."""

    def __init__(self, center: CommandCenter, info: dict | None = None) -> None:
        self.center = center
        self.sent: list[dict] = []
        self._cond = threading.Condition()
        center.attach(self._send, info or {}, lambda: None)

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


def test_a_run_whose_first_delivery_broke_midway_is_answered_when_delivered_again(
        monkeypatch):
    center = CommandCenter()
    center.add(declare("inc", lambda run: None))
    link = Attached(center)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while checking params")

    monkeypatch.setattr(commands, "coerce_params", broken)
    with pytest.raises(RuntimeError):  # the link logs it
        center.handle(run_frame("r1"))  # the run is known but has said nothing yet
    assert link.sent == []
    center.handle(run_frame("r1"))
    answer = link.final("r1")
    assert [(f["seq"], f["state"], f["error_code"], f["error_message"]) for f in answer] == [
        (1, "failed", "duplicate", "this run was already received")]


def test_a_forgotten_run_is_audited_as_a_duplicate_once_and_then_replayed(monkeypatch):
    monkeypatch.setattr(commands, "REMEMBERED_RUNS", 1)
    center = CommandCenter()
    center.add(declare("inc", lambda run: None))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    for run_id in ("r1", "r2"):
        center.handle({**run_frame(run_id), "attempt": 3})
        link.final(run_id)
    center.handle({**run_frame("r1"), "attempt": 4})  # forgotten: a ghost answers
    center.handle(run_frame("r1"))  # the ghost is remembered: its answer is replayed
    ghost, again = link.final("r1", count=3)[1:]
    assert again == {**ghost, "seq": 2}
    duplicate = records[-1]
    assert len(records) == 3 and {k: duplicate[k] for k in (
        "run_id", "command", "params", "via", "attempt", "outcome", "error_code")} == {
        "run_id": "r1", "command": "inc", "params": {}, "via": "command_run", "attempt": 1,
        "outcome": "failed", "error_code": "duplicate"}



def legacy_answer(link: Attached, cid: str, timeout: float = 5.0) -> dict:
    """The ``result`` or ``error`` event of a legacy command, after its ``ack``."""
    def events() -> list[dict]:
        return [f for f in link.sent if f.get("id") == cid]

    with link._cond:
        link._cond.wait_for(lambda: len(events()) >= 2, timeout)
        first, answer = events()[:2]
    assert first == {"type": "command_result", "id": cid, "command": first["command"],
                     "event": "ack"}
    return answer


def test_command_failed_names_its_code_and_message_for_both_generations():
    from plexus.commands import CommandFailed

    def missing(run, path: str):
        raise CommandFailed("not_found", f"no file {path}")

    center = CommandCenter()
    center.add(declare("fetch", missing, params={"path": {"type": "string"}}))
    link = Attached(center)
    center.handle({**run_frame("r1", "fetch"), "params": {"path": "/x"}})
    final = link.final("r1")[0]
    assert (final["state"], final["error_code"], final["error_message"]) == (
        "failed", "not_found", "no file /x")
    center.handle({"type": "typed_command", "id": "c1", "command": "fetch",
                   "params": {"path": "/y", "source_id": "pod-07"}})
    assert legacy_answer(link, "c1") == {"type": "command_result", "id": "c1",
                                         "command": "fetch", "event": "error",
                                         "error": "not_found: no file /y"}


def test_a_declared_command_answers_legacy_frames_with_each_outcome():
    from plexus.commands import Cancelled

    def outcome(run, how: str):
        if how == "ok":
            return {"done": True}
        if how == "stop":
            raise Cancelled("operator said stop")
        if how == "quiet":
            raise Cancelled()
        raise ValueError("boom")

    center = CommandCenter()
    center.add(declare("act", outcome, params={"how": {"type": "string"}}))
    records: list[dict] = []
    center.on_outcome = records.append  # the audit trail
    link = Attached(center)
    answers = {}
    for how in ("ok", "stop", "quiet", "boom"):
        center.handle({"type": "typed_command", "id": how, "command": "act",
                       "params": {"how": how}})
        answer = legacy_answer(link, how)
        answers[how] = answer.get("result", answer.get("error"))
    assert answers == {"ok": {"done": True}, "stop": "cancelled: operator said stop",
                       "quiet": "cancelled: cancelled by the handler",
                       "boom": "ValueError: boom"}
    assert center.counts["succeeded"] == 1 and center.counts["failed"] == 3
    assert [(r["outcome"], r["error_code"], r["message"], r["via"]) for r in records] == [
        ("succeeded", None, None, "typed_command"),
        ("failed", "cancelled", "cancelled: operator said stop", "typed_command"),
        ("failed", "cancelled", "cancelled: cancelled by the handler", "typed_command"),
        ("failed", "handler_error", "ValueError: boom", "typed_command")]
    assert center.last["outcome"] == "failed (handler_error)"


def test_a_refused_command_is_not_announced_and_its_runs_fail_as_not_allowed():
    center = CommandCenter()
    center.add(declare("drive", lambda run: None))
    before = center.version
    center.refuse("drive", "moves the vehicle: not in commands.allow")
    assert center.version == before + 1 and center.manifest() == []
    link = Attached(center)
    center.handle(run_frame("r1", "drive"))
    final = link.final("r1")[0]
    assert (final["error_code"], final["error_message"]) == (
        "not_allowed", "moves the vehicle: not in commands.allow")
    center.handle({"type": "typed_command", "id": "c1", "command": "drive", "params": {}})
    assert legacy_answer(link, "c1")["error"] == "moves the vehicle: not in commands.allow"


def test_the_command_decorator_returns_a_callable_declaration():
    from plexus.commands import Command, command

    @command("reboot", danger="critical")
    def reboot(run, delay: int = 0):
        return ("rebooting", delay)

    assert isinstance(reboot, Command)
    assert (reboot.name, reboot.danger) == ("reboot", "critical")
    assert reboot(None, delay=3) == ("rebooting", 3)


def test_a_legacy_run_past_its_expiry_is_answered_once_and_its_late_outcome_discarded(caplog):
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    release = threading.Event()

    def slow(run, fail: bool = False):
        release.wait(5)
        if fail:
            raise ValueError("too late to matter")
        return "done"

    center.add(declare("act", slow, expires_in=5,
                       params={"fail": {"type": "boolean", "default": False}}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    caplog.set_level(logging.WARNING, logger="plexus.commands")
    for cid, fail in (("c1", False), ("c2", True)):
        center.handle({"type": "typed_command", "id": cid, "command": "act",
                       "params": {"fail": fail}})
    clock.now += 5.0  # exactly at the expiry
    center.check_deadlines()
    for cid in ("c1", "c2"):
        assert legacy_answer(link, cid) == {
            "type": "command_result", "id": cid, "command": "act", "event": "error",
            "error": "timeout: no result before the run expired; the handler was asked to "
                     "stop and a late result will be discarded"}
    assert [(r["run_id"], r["error_code"]) for r in records] == [("c1", "timeout"),
                                                                 ("c2", "timeout")]
    release.set()
    late = ["command act (run c1) finished (succeeded) after it had already been answered "
            "(expired); the late outcome is discarded",
            "command act (run c2) finished (failed) after it had already been answered "
            "(expired); the late outcome is discarded"]
    deadline = time.monotonic() + 5
    while not all(m in caplog.messages for m in late) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(m in caplog.messages for m in late)
    assert [f.get("event") for f in link.sent] == ["ack", "ack", "error", "error"]
    assert center.counts["failed"] == 2 and center.counts["succeeded"] == 0


def test_progress_once_a_second_on_the_centers_clock_messages_only_as_text(monkeypatch):
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    step, done = threading.Event(), threading.Event()
    reports: list[tuple] = [(10, "start"), (20, None), (30, 42), (100, "done")]

    def work(run):
        for percent, message in reports:
            step.wait(5)
            step.clear()
            run.progress(percent, message)
            done.set()

    center.add(declare("work", work))
    link = Attached(center)
    center.handle(run_frame("r1", "work"))
    for advance in (0.0, 0.999, 0.001, 0.0):  # 10 sent; 20 too soon; 30 at 1 s; 100 always
        clock.now += advance
        step.set()
        assert done.wait(5)
        done.clear()
    final = link.final("r1")
    progress = [f for f in link.sent if f.get("state") == "progress"]
    assert [(f["progress"], f.get("message")) for f in progress] == [
        (10.0, "start"), (30.0, None), (100.0, "done")]
    assert "message" not in progress[1]  # no text, no field
    assert final[0]["seq"] == progress[-1]["seq"] + 1


def test_a_legacy_run_and_a_finished_one_send_no_progress():
    center = CommandCenter()
    runs = []
    center.add(declare("act", lambda run: runs.append(run)))
    link = Attached(center)
    center.handle(run_frame("r1", "act"))
    link.final("r1")
    runs[0].progress(50)  # after the final status: nothing
    center.handle({"type": "typed_command", "id": "c1", "command": "act", "params": {}})
    legacy_answer(link, "c1")
    runs[1].progress(50)  # the legacy protocol has no progress frames
    assert not [f for f in link.sent if f.get("state") == "progress"]


def test_a_rejected_run_is_audited_with_the_params_it_came_with():
    center = CommandCenter()
    center.add(declare("set", lambda run, level: level, params={"level": {"type": "integer"}}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    center.handle({**run_frame("r1", "set"), "params": {"level": "high", "token": "t"}})
    center.handle({**run_frame("r2", "set"), "params": ["not", "an", "object"]})
    link.final("r1"), link.final("r2")
    assert [(r["run_id"], r["error_code"], r["params"]) for r in records] == [
        ("r1", "bad_params", {"level": "high", "token": "***"}),
        ("r2", "bad_params", {})]


def test_a_legacy_result_that_cannot_be_encoded_or_is_too_large():
    center = CommandCenter()
    center.add(declare("odd", lambda run: {"when": object()}))
    center.add(declare("huge", lambda run: "x" * (1024 * 1024)))
    link = Attached(center)
    center.handle({"type": "typed_command", "id": "c1", "command": "odd", "params": {}})
    answer = legacy_answer(link, "c1")
    assert answer["event"] == "result" and answer["result"]["value"].startswith("{'when': <object")
    center.handle({"type": "typed_command", "id": "c2", "command": "huge", "params": {}})
    answer = legacy_answer(link, "c2")
    assert answer["event"] == "error"
    assert answer["error"].startswith("result too large (") and answer["error"].endswith(
        " bytes; the link carries at most 1 MiB)")
    assert center.counts == {"runs": 2, "succeeded": 1, "failed": 1, "duplicates": 0}


def test_a_legacy_result_up_to_the_limit_is_sent_and_one_byte_more_is_not():
    import orjson

    from plexus.commands import LEGACY_FRAME_LIMIT

    frame = {"type": "command_result", "id": "c1", "command": "fill", "event": "result",
             "result": {"value": ""}}
    room = LEGACY_FRAME_LIMIT - len(orjson.dumps(frame))
    sizes = {"c1": room, "c2": room + 1}
    center = CommandCenter()
    center.add(declare("fill", lambda run, n: "x" * n, params={"n": {"type": "integer"}}))
    center.add(declare("odd", lambda run: {"long": "y" * 1000, "when": object()}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    for cid, n in sizes.items():
        center.handle({"type": "typed_command", "id": cid, "command": "fill", "params": {"n": n}})
    assert legacy_answer(link, "c1")["event"] == "result"
    assert legacy_answer(link, "c2")["event"] == "error"
    assert {r["run_id"]: r["error_code"] for r in records} == {"c1": None, "c2": "too_large"}
    center.handle({"type": "typed_command", "id": "c3", "command": "odd", "params": {}})
    assert len(legacy_answer(link, "c3")["result"]["value"]) == 512  # its repr, cut


def test_a_legacy_handler_is_answered_with_its_value_or_the_error_it_raised():
    center = CommandCenter()
    center.add_legacy("echo", lambda command, params: {"cmd": command, **params})
    center.add_legacy("quiet", lambda command, params: None)

    def fail(command, params):
        raise (RuntimeError() if params.get("bare") else KeyError("missing"))

    center.add_legacy("fail", fail)
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    frames = {"c1": ("echo", {"a": 1}), "c2": ("quiet", {}), "c3": ("fail", {}),
              "c4": ("fail", {"bare": True})}
    for cid, (name, params) in frames.items():
        center.handle({"type": "typed_command", "id": cid, "command": name, "params": params})
    answers = {cid: legacy_answer(link, cid) for cid in frames}
    assert answers["c1"]["result"] == {"cmd": "echo", "a": 1}
    assert answers["c2"]["result"] == {}
    assert answers["c3"]["error"] == "'missing'"
    assert answers["c4"]["error"] == "RuntimeError"
    assert {r["run_id"]: (r["outcome"], r["error_code"], r["via"]) for r in records} == {
        "c1": ("succeeded", None, "typed_command"), "c2": ("succeeded", None, "typed_command"),
        "c3": ("failed", "handler_error", "typed_command"),
        "c4": ("failed", "handler_error", "typed_command")}


def test_a_declared_command_run_through_the_legacy_frame_gets_its_run_and_its_code():
    from plexus.commands import CommandFailed

    def missing(run, path: str):
        raise CommandFailed("not_found", f"{run.command} {run.id}: no file {path}")

    center = CommandCenter()
    center.add(declare("fetch", missing, params={"path": {"type": "string"}}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    center.handle({"type": "typed_command", "id": "c1", "command": "fetch",
                   "params": {"path": "/y"}})
    assert legacy_answer(link, "c1")["error"] == "not_found: fetch c1: no file /y"
    assert (records[0]["error_code"], records[0]["message"]) == (
        "not_found", "not_found: fetch c1: no file /y")


def test_command_failed_reads_as_its_message():
    from plexus.commands import CommandFailed

    failure = CommandFailed("refused", "the arm is moving")
    assert (str(failure), failure.code, failure.message) == (
        "the arm is moving", "refused", "the arm is moving")


def test_run_wait_sleeps_the_time_asked_and_wakes_at_once_on_cancel():
    center = CommandCenter()
    started, woke = threading.Event(), threading.Event()
    waited: dict[str, object] = {}

    def nap(run):
        t0 = time.monotonic()
        waited["short"] = run.wait(0.05)
        waited["took"] = time.monotonic() - t0
        started.set()
        waited["long"] = run.wait(30)  # until the center closes
        woke.set()

    center.add(declare("nap", nap))
    Attached(center)
    center.handle({**run_frame("r1", "nap"), "ttl_ms": 60000})
    assert started.wait(5)
    assert waited["short"] is False and 0.04 <= waited["took"] < 5
    center.close()
    assert woke.wait(5) and waited["long"] is True


def test_legacy_frames_refused_unknown_or_with_bad_params_are_answered_and_audited():
    center = CommandCenter()
    center.add(declare("set", lambda run, level: level, params={"level": {"type": "integer"}}))
    center.add(declare("drive", lambda run: None))
    center.refuse("drive", "moves the vehicle")
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    given = {"level": "high", "source_id": "pod-07"}
    frames = {"c1": ("drive", {}), "c2": ("nope", {}), "c3": ("set", given),
              "c4": ("set", ["not", "an", "object"])}
    for cid, (name, params) in frames.items():
        center.handle({"type": "typed_command", "id": cid, "command": name, "params": params})
    assert {cid: legacy_answer(link, cid)["error"] for cid in frames} == {
        "c1": "moves the vehicle", "c2": "unknown command: nope",
        "c3": "bad_params: level must be an integer, got 'high'",
        "c4": "bad_params: params must be an object, got an array"}
    assert given == {"level": "high", "source_id": "pod-07"}  # the frame is left as it came
    assert [(r["run_id"], r["error_code"], r["params"], r["attempt"], r["via"])
            for r in records] == [
        ("c1", "not_allowed", {}, 1, "typed_command"),
        ("c2", "unknown_command", {}, 1, "typed_command"),
        ("c3", "bad_params", given, 1, "typed_command"),
        ("c4", "bad_params", {}, 1, "typed_command")]


def test_a_legacy_frame_may_give_an_object_for_a_string_parameter_a_run_may_not():
    center = CommandCenter()
    center.add(declare("note", lambda run, text: text, params={"text": {"type": "string"}}))
    link = Attached(center)
    center.handle({"type": "typed_command", "id": "c1", "command": "note",
                   "params": {"text": {"a": [1, 2]}}})
    assert legacy_answer(link, "c1")["result"] == {"value": '{"a":[1,2]}'}
    center.handle({**run_frame("r1", "note"), "params": {"text": {"a": [1, 2]}}})
    final = link.final("r1")[0]
    assert (final["error_code"], final["error_message"]) == (
        "bad_params", "text must be a string, got an object")


def test_legacy_handlers_are_checked_when_added():
    from plexus.commands import CommandDeclarationError

    def handler(command, params):
        return None

    center = CommandCenter()
    center.add(declare("declared", lambda run: None))
    refused = [
        (("", handler), {}, "a command name must be a non-empty string, got ''"),
        ((5, handler), {}, "a command name must be a non-empty string, got 5"),
        (("x", "not callable"), {}, "command 'x': the handler must be callable"),
        (("x", handler), {"concurrency": "queue"},
         "command 'x': concurrency must be accept or reject, got 'queue'"),
        (("declared", handler), {}, "command 'declared' is already declared")]
    for args, kwargs, message in refused:
        with pytest.raises(CommandDeclarationError) as caught:
            center.add_legacy(*args, **kwargs)
        assert str(caught.value) == message
    before = center.version
    center.add_legacy("x", handler)
    assert center.version == before + 1 and center.legacy["x"].concurrency == "accept"
    with pytest.raises(CommandDeclarationError, match="^command 'x' is already declared$"):
        center.add_legacy("x", handler)


def test_a_handler_that_raises_is_logged_with_its_traceback_at_debug(caplog):
    def boom(run):
        raise ValueError("boom")

    center = CommandCenter()
    center.add(declare("boom", boom))
    link = Attached(center)
    caplog.set_level(logging.DEBUG, logger="plexus.commands")
    center.handle(run_frame("r1", "boom"))
    link.final("r1")
    raised = [r for r in caplog.records if r.getMessage() == "command boom raised"]
    assert len(raised) == 1 and raised[0].levelno == logging.DEBUG
    assert raised[0].exc_info is not None and raised[0].exc_info[0] is ValueError


def test_a_legacy_answer_the_link_cannot_take_is_logged_as_dropped(caplog):
    center = CommandCenter()
    center.add_legacy("echo", lambda command, params: params)
    accepted: list[dict] = []
    center.attach(lambda frame: accepted.append(frame) or frame.get("event") == "ack", {},
                  lambda: None)
    caplog.set_level(logging.INFO, logger="plexus.commands")
    center.handle({"type": "typed_command", "id": "c1", "command": "echo", "params": {}})
    assert wait_until(lambda: len(accepted) == 2, 5)
    center.detach()
    center.handle({"type": "typed_command", "id": "c2", "command": "echo", "params": {}})
    dropped = "command result echo/{} dropped: the link is down"
    assert wait_until(lambda: dropped.format("result") in caplog.messages[-1:], 5)
    assert [m for m in caplog.messages if "dropped" in m] == [
        dropped.format("result"), dropped.format("ack"), dropped.format("result")]


def expiry_watchdogs() -> list[threading.Thread]:
    """The expiry watchdog threads alive now, of any center (earlier tests' linger)."""
    return [t for t in threading.enumerate() if t.name == "plexus-command-expiry"]


def test_one_expiry_watchdog_runs_and_ends_once_there_is_nothing_to_watch(monkeypatch):
    monkeypatch.setattr(commands, "WATCHDOG_IDLE_S", 0.05)
    center = CommandCenter()
    release = threading.Event()
    center.add(declare("hold", lambda run: release.wait(5)))
    link = Attached(center)

    others = set(expiry_watchdogs())

    def watchdogs() -> list[threading.Thread]:  # this center's, not earlier tests' lingering
        return [t for t in expiry_watchdogs() if t not in others]

    for run_id in ("r1", "r2"):
        center.handle(run_frame(run_id, "hold"))
    assert len(watchdogs()) == 1 and watchdogs()[0].daemon
    release.set()
    link.final("r1"), link.final("r2")
    assert wait_until(lambda: center._watchdog is None and not watchdogs(), 5)
    center.handle(run_frame("r3", "hold"))  # a new run with an expiry starts it again
    assert len(watchdogs()) == 1
    link.final("r3")


def test_the_last_free_slot_is_taken_and_the_next_run_is_refused_as_busy():
    release = threading.Event()
    center = CommandCenter(max_running=2)
    center.add(declare("hold", lambda run: release.wait(5)))
    link = Attached(center)
    try:
        for run_id in ("r1", "r2", "r3"):
            center.handle(run_frame(run_id, "hold"))
        final = link.final("r3")[0]
        assert (final["error_code"], final["error_message"]) == (
            "busy", "too many commands running at once (2)")
        records: list[dict] = []
        center.on_outcome = records.append
        center.handle({"type": "typed_command", "id": "c1", "command": "hold", "params": {}})
        assert legacy_answer(link, "c1")["error"] == "too many commands running at once (2)"
        assert [(r["run_id"], r["error_code"]) for r in records] == [("c1", "busy")]
        assert not link.final("r1", timeout=0.05) and not link.final("r2", timeout=0.05)
    finally:
        release.set()
    assert link.final("r1") and link.final("r2")


def test_the_watchdog_answers_a_run_at_its_expiry_not_at_its_next_look(monkeypatch):
    monkeypatch.setattr(commands, "WATCHDOG_SLICE_S", 30.0)  # only the expiry can wake it
    center = CommandCenter()
    release = threading.Event()
    center.add(declare("hold", lambda run: release.wait(10)))
    link = Attached(center)
    try:
        center.handle({**run_frame("r1", "hold"), "ttl_ms": 200})
        final = link.final("r1", timeout=5)
        assert [(f["state"], f["error_code"]) for f in final] == [("failed", "timeout")]
    finally:
        release.set()


def test_the_watchdog_notices_an_injected_clock_that_jumps():
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    release = threading.Event()
    center.add(declare("hold", lambda run: release.wait(10)))
    link = Attached(center)
    try:
        center.handle({**run_frame("r1", "hold"), "ttl_ms": 60_000})
        clock.now += 61  # no check_deadlines(): the watchdog's next look finds it
        final = link.final("r1", timeout=5)
        assert [(f["state"], f["error_code"]) for f in final] == [("failed", "timeout")]
    finally:
        release.set()


def test_a_run_without_a_usable_run_id_is_ignored_with_a_debug_line(caplog):
    center = CommandCenter()
    center.add(declare("inc", lambda run: None))
    link = Attached(center)
    caplog.set_level(logging.DEBUG, logger="plexus.commands")
    for run_id in (None, "", 7):
        frame = run_frame("x")
        frame["run_id"] = run_id
        center.handle(frame)
    assert link.sent == [] and center.counts["runs"] == 0
    assert caplog.messages == ["command_run without a run_id ignored"] * 3


def test_a_runs_attempt_and_name_are_taken_only_when_well_formed():
    center = CommandCenter()
    center.add(declare("inc", lambda run: None))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    attempts = {"r1": 4, "r2": True, "r3": "3", "r4": None}
    for run_id, attempt in attempts.items():
        frame = run_frame(run_id)
        if attempt is not None:
            frame["attempt"] = attempt
        center.handle(frame)
        link.final(run_id)
    center.handle({**run_frame("r5"), "command": 5})
    assert link.final("r5")[0]["error_message"] == "unknown command: "
    assert [(r["run_id"], r["attempt"]) for r in records] == [
        ("r1", 4), ("r2", 1), ("r3", 1), ("r4", 1), ("r5", 1)]


def test_runs_refused_before_they_start_are_audited_with_the_params_they_came_with():
    release = threading.Event()
    center = CommandCenter(max_running=1)
    center.add(declare("hold", lambda run, n: release.wait(5), params={"n": {"type": "integer"}}))
    center.add(declare("drive", lambda run: None))
    center.refuse("drive", "moves the vehicle")
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    try:
        center.handle({**run_frame("r1", "hold"), "params": {"n": "1"}})
        center.handle({**run_frame("r2", "hold"), "params": {"n": "2"}})  # busy
        center.handle({**run_frame("r3", "drive"), "params": {"speed": 3}})
        center.handle({**run_frame("r4", "nope"), "params": {"token": "t"}})
        center.handle({**run_frame("r5", "hold"), "params": {"n": 5}, "ttl_ms": 0})
        for run_id in ("r2", "r3", "r4", "r5"):
            link.final(run_id)
    finally:
        release.set()
    link.final("r1")
    assert [(r["run_id"], r["error_code"], r["params"]) for r in records] == [
        ("r2", "busy", {"n": 2}), ("r3", "not_allowed", {"speed": 3}),
        ("r4", "unknown_command", {"token": "***"}), ("r5", "expired_on_arrival", {"n": 5}),
        ("r1", None, {"n": 1})]
    assert link.final("r5")[0]["error_message"] == "the run expired before it arrived (ttl_ms 0)"


def test_a_run_expires_exactly_ttl_ms_after_it_arrived():
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    release = threading.Event()
    runs: dict[str, object] = {}

    def hold(run):
        runs[run.id] = run
        release.wait(5)

    center.add(declare("hold", hold))
    link = Attached(center)
    try:
        center.handle({**run_frame("r1", "hold"), "ttl_ms": 10_000})
        center.handle({**run_frame("r2", "hold"), "ttl_ms": 1})  # short, but not expired
        assert wait_until(lambda: len(runs) == 2, 5)
        clock.now += 9.995
        center.check_deadlines()
        assert [(f["run_id"], f["error_code"]) for f in link.sent
                if f.get("state") == "failed"] == [("r2", "timeout")]
        assert (runs["r1"].cancel_requested, runs["r2"].cancel_requested) == (False, True)
        clock.now += 0.005
        center.check_deadlines()
        final = link.final("r1")[0]
        assert (final["error_code"], final["error_message"]) == (
            "timeout", "no result before the run expired; the handler was asked to stop and "
                       "a late result will be discarded")
        assert runs["r1"].cancel_requested and runs["r1"].time_remaining == 0.0
        center.check_deadlines()  # answered once
        assert len(link.final("r1")) == 1
    finally:
        release.set()


def test_run_ids_and_statuses_are_remembered_up_to_their_limits(monkeypatch):
    monkeypatch.setattr(commands, "SEEN_RUN_IDS", 3)
    monkeypatch.setattr(commands, "REMEMBERED_RUNS", 2)
    center = CommandCenter()
    calls: list[str] = []
    center.add(declare("inc", lambda run: calls.append(run.id)))
    link = Attached(center)
    for run_id in ("r1", "r2", "r3", "r4"):  # r1's id is forgotten, r2's status is
        center.handle(run_frame(run_id))
        link.final(run_id)
    center.handle(run_frame("r3"))  # remembered: its answer again
    assert link.final("r3", count=2)[1]["state"] == "succeeded"
    center.handle(run_frame("r2"))  # its id is remembered, its status is not
    assert link.final("r2", count=2)[1]["error_code"] == "duplicate"
    center.handle(run_frame("r1"))  # forgotten altogether: it runs again
    link.final("r1", count=2)
    assert calls == ["r1", "r2", "r3", "r4", "r1"]


def test_a_declared_run_past_its_expiry_discards_its_late_outcome(caplog):
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    release = threading.Event()
    center.add(declare("act", lambda run: release.wait(5) and "done"))
    link = Attached(center)
    caplog.set_level(logging.WARNING, logger="plexus.commands")
    center.handle({**run_frame("r1", "act"), "ttl_ms": 5000})
    clock.now += 5.0
    center.check_deadlines()
    assert link.final("r1")[0]["error_code"] == "timeout"
    release.set()
    late = ("command act (run r1) finished (succeeded) after it had already been answered "
            "(expired); the late outcome is discarded")
    assert wait_until(lambda: late in caplog.messages, 5)
    assert len(link.final("r1")) == 1 and center.counts["succeeded"] == 0


def test_declared_runs_are_audited_with_their_outcome_and_message():
    from plexus.commands import CommandFailed

    def act(run, fail: bool):
        if fail:
            raise CommandFailed("refused", "the arm is moving")
        return "ok"

    center = CommandCenter()
    center.add(declare("act", act, params={"fail": {"type": "boolean"}}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    for run_id, fail in (("r1", False), ("r2", True)):
        center.handle({**run_frame(run_id, "act"), "params": {"fail": fail}})
        link.final(run_id)
    assert [(r["outcome"], r["error_code"], r["message"], r["via"]) for r in records] == [
        ("succeeded", None, None, "command_run"),
        ("failed", "refused", "the arm is moving", "command_run")]
    assert center.counts["succeeded"] == 1 and center.counts["failed"] == 1
    assert center.last["outcome"] == "failed (refused)"


def test_a_declared_result_that_cannot_be_encoded_is_sent_as_its_repr_cut_to_512():
    center = CommandCenter()
    center.add(declare("odd", lambda run: {"long": "y" * 1000, "when": object()}))
    link = Attached(center)
    center.handle(run_frame("r1", "odd"))
    value = link.final("r1")[0]["result"]["value"]
    assert len(value) == 512 and value.startswith("{'long': 'yyy")


def test_a_progress_message_too_large_for_a_frame_is_left_out():
    center = CommandCenter()
    center.add(declare("work", lambda run: run.progress(100, "m" * (70 * 1024))))
    link = Attached(center)
    center.handle(run_frame("r1", "work"))
    link.final("r1")
    progress = [f for f in link.sent if f.get("state") == "progress"]
    assert progress == [{"type": "command_status", "run_id": "r1", "seq": 3,
                         "state": "progress", "progress": 100.0}]


def test_a_status_over_a_tiny_server_limit_is_sent_with_what_it_must_carry():
    from plexus.commands import CommandFailed

    def act(run, fail: bool):
        if fail:
            raise CommandFailed("refused", "the arm is moving")
        return {"big": "x" * 100}

    center = CommandCenter()
    center.add(declare("act", act, params={"fail": {"type": "boolean"}}))
    link = Attached(center, {"max_frame_bytes": 40})  # smaller than any status
    for run_id, fail in (("r1", False), ("r2", True)):
        center.handle({**run_frame(run_id, "act"), "params": {"fail": fail}})
    assert link.final("r1")[0] == {"type": "command_status", "run_id": "r1", "seq": 3,
                                   "state": "succeeded"}
    assert link.final("r2")[0] == {"type": "command_status", "run_id": "r2", "seq": 3,
                                   "state": "failed", "error_code": "refused"}


# The audit record, the replay on attach, acknowledgements --------------------------------------
@pytest.fixture
def local_time_not_utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC-05:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_an_outcome_is_recorded_logged_and_kept_as_the_last(caplog, local_time_not_utc):
    import datetime
    import re


    def setter(run, level, token=""):
        time.sleep(0.05)
        return level

    center = CommandCenter()
    center.add(declare("set", setter, params={"level": {"type": "integer"},
                                              "token": {"type": "string", "required": False}}))
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    caplog.set_level(logging.INFO, logger="plexus.commands")
    center.handle({**run_frame("r1", "set"), "params": {"level": 3, "token": "abc"}})
    link.final("r1")
    record = records[0]
    assert set(record) == {"time", "run_id", "command", "params", "via", "attempt", "outcome",
                           "error_code", "message", "duration_s"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["time"])
    stamped = datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc)
    assert abs(stamped.timestamp() - time.time()) < 5  # UTC, not local time
    assert 0.05 <= record["duration_s"] < 2 and round(record["duration_s"], 3) == record[
        "duration_s"]  # a 50 ms handler
    assert record["params"] == {"level": 3, "token": "***"}
    logged = [r for r in caplog.records if r.getMessage().startswith("command set ")]
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.INFO, 'command set {"level":3,"token":"***"}: succeeded')]
    assert center.last is not None and center.last["command"] == "set"
    assert center.last["outcome"] == "succeeded" and abs(center.last["at"] - time.time()) < 5
    center.handle({**run_frame("r2", "set"), "params": {"level": "high"}})
    link.final("r2")
    logged = [r for r in caplog.records if r.getMessage().startswith("command set ")]
    assert (logged[-1].levelno, logged[-1].getMessage()) == (
        logging.WARNING,
        'command set {"level":"high"}: failed (bad_params: level must be an integer, '
        "got 'high')")


def test_a_value_json_cannot_carry_is_logged_as_its_repr(caplog):
    center = CommandCenter()
    caplog.set_level(logging.WARNING, logger="plexus.commands")
    center.handle({**run_frame("r1", "nope"), "params": {"when": 1j}})  # handed in directly
    assert caplog.messages == ['command nope {"when":"1j"}: failed (unknown_command: '
                               "unknown command: nope)"]


def test_an_audit_that_fails_is_logged_and_the_answer_still_goes_out(caplog):
    def full(record: dict) -> None:
        raise OSError("disk full")

    center = CommandCenter(on_outcome=full)
    center.add(declare("inc", lambda run: 1))
    link = Attached(center)
    caplog.set_level(logging.ERROR, logger="plexus.commands")
    center.handle(run_frame("r1"))
    assert link.final("r1")[0]["result"] == {"value": 1}
    assert caplog.messages == ["recording the outcome of command inc failed: disk full"]


def finished_while_detached(center: CommandCenter, *run_ids: str) -> None:
    """Run each to its end with no link attached: every status is kept."""
    for n, run_id in enumerate(run_ids, 1):  # one after the other: the order is known
        center.handle(run_frame(run_id))
        assert wait_until(lambda n=n: center.kept == 3 * n, 5)


def test_attaching_replays_a_sync_of_each_runs_last_state_then_the_kept_statuses():
    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    assert center.attach(lambda frame: True, {}, lambda: None) == []  # nothing kept
    center.detach()
    finished_while_detached(center, "r1", "r2")
    enabled: list[bool] = []
    frames = center.attach(lambda frame: True, {}, lambda: enabled.append(True))
    assert enabled == [True]
    assert frames[0] == {"type": "command_sync", "runs": [
        {"run_id": "r1", "state": "succeeded", "seq": 3},
        {"run_id": "r2", "state": "succeeded", "seq": 3}]}
    assert [(f["run_id"], f["seq"], f["state"]) for f in frames[1:]] == [
        ("r1", 1, "acknowledged"), ("r1", 2, "running"), ("r1", 3, "succeeded"),
        ("r2", 1, "acknowledged"), ("r2", 2, "running"), ("r2", 3, "succeeded")]


@pytest.mark.parametrize("info,limit,store", [
    ({}, 64 * 1024, True),
    ({"max_frame_bytes": 1000, "store_results": False}, 1000, False),
    ({"max_frame_bytes": 10**9, "store_results": None}, 64 * 1024, True),
    ({"max_frame_bytes": 0, "store_results": 0}, 64 * 1024, True),
    ({"max_frame_bytes": -5}, 64 * 1024, True),
    ({"max_frame_bytes": "1000"}, 64 * 1024, True),
    ({"max_frame_bytes": 1}, 1, True)])
def test_attaching_takes_the_servers_frame_limit_and_result_storage(info, limit, store):
    center = CommandCenter()
    center.max_frame_bytes, center.store_results = 5, not store  # what a previous link said
    center.attach(lambda frame: True, info, lambda: None)
    assert (center.max_frame_bytes, center.store_results) == (limit, store)


def test_acknowledged_statuses_are_no_longer_kept():
    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    finished_while_detached(center, "r1", "r2")
    for bad in ({"run_id": 5, "seq": 3}, {"run_id": "r1", "seq": "3"}, {"run_id": "r1"}):
        center.handle({"type": "command_status_ack", **bad})
    assert center.kept == 6
    center.handle({"type": "command_status_ack", "run_id": "r1", "seq": 2})
    assert center.kept == 4
    center.handle({"type": "command_status_ack", "run_id": "r1", "seq": 3})
    assert center.kept == 3  # r2's are still waiting
    frames = center.attach(lambda frame: True, {}, lambda: None)
    assert [(f["run_id"], f["seq"]) for f in frames[1:]] == [("r2", 1), ("r2", 2), ("r2", 3)]


def test_statuses_past_the_kept_limit_are_forgotten_oldest_first_with_a_warning(monkeypatch,
                                                                              caplog):
    monkeypatch.setattr(commands, "KEPT_STATUSES", 2)
    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    caplog.set_level(logging.WARNING, logger="plexus.commands")
    center.handle(run_frame("r1"))
    assert wait_until(lambda: len(caplog.messages) == 1, 5)
    assert center.kept == 2
    assert caplog.messages == ["more than 2 command statuses await the platform's "
                               "acknowledgement; status 1 of run r1 is forgotten"]
    frames = center.attach(lambda frame: True, {}, lambda: None)
    assert [f["seq"] for f in frames[1:]] == [2, 3]


def test_a_handler_thread_that_cannot_start_is_answered_busy_and_frees_its_slot(monkeypatch):
    started = threading.Thread.start

    def refuse_handlers(thread: threading.Thread) -> None:
        if thread.name.startswith("plexus-command:"):
            raise RuntimeError("can't start new thread")
        started(thread)

    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    center.add_legacy("old", lambda command, params: 1)
    records: list[dict] = []
    center.on_outcome = records.append
    link = Attached(center)
    monkeypatch.setattr(threading.Thread, "start", refuse_handlers)
    center.handle(run_frame("r1"))
    center.handle({"type": "typed_command", "id": "c1", "command": "inc", "params": {}})
    center.handle({"type": "typed_command", "id": "c2", "command": "old", "params": {}})
    monkeypatch.undo()
    final = link.final("r1")[0]
    assert (final["error_code"], final["error_message"]) == (
        "busy", "failed to start command handler: can't start new thread")
    for cid in ("c1", "c2"):
        assert legacy_answer(link, cid)["error"] == (
            "failed to start command handler: can't start new thread")
    assert [(r["run_id"], r["error_code"]) for r in records] == [
        ("r1", "busy"), ("c1", "busy"), ("c2", "busy")]
    assert center._running == 0 and center._active == {"inc": 0, "old": 0}
    center.handle(run_frame("r2"))
    assert link.final("r2")[0]["result"] == {"value": 1}


def test_a_center_starts_with_the_documented_defaults():
    center = CommandCenter()
    assert (center.max_running, center.max_frame_bytes, center.store_results, center.last,
            center.version, center.kept, center.wants_link) == (64, 64 * 1024, True, None, 0,
                                                                0, False)
    assert center.counts == {"runs": 0, "succeeded": 0, "failed": 0, "duplicates": 0}


def test_only_command_frames_are_handled():
    center = CommandCenter()
    for kind in ("command_run", "typed_command", "command_status_ack"):
        assert center.handle({"type": kind}) is True
    for frame in ({"type": "heartbeat"}, {"type": None}, {}):
        assert center.handle(frame) is False


def test_closing_asks_running_handlers_to_stop_and_sends_nothing_more():
    center = CommandCenter()
    asked = threading.Event()

    def patient(run):
        while not run.cancel_requested:
            time.sleep(0.01)
        asked.set()
        return "stopped"

    center.add(declare("patient", patient))
    link = Attached(center)
    center.handle(run_frame("r1", "patient"))
    assert wait_until(lambda: [f for f in link.sent if f.get("state") == "running"], 5)
    center.close()
    assert asked.wait(5)
    assert wait_until(lambda: center.kept == 3, 5)  # the final status is kept, not sent
    assert link.final("r1", timeout=0.1) == []
    sent = len(link.sent)
    center.handle({"type": "typed_command", "id": "c1", "command": "nope", "params": {}})
    assert len(link.sent) == sent  # answered into the void: the link is gone


def test_handlers_run_on_named_daemon_threads_and_number_keys_reach_the_status():
    seen: list[tuple[str, bool]] = []

    def table(run):
        thread = threading.current_thread()
        seen.append((thread.name, thread.daemon))
        return {1: "one"}

    center = CommandCenter()
    center.add(declare("table", table))
    link = Attached(center)
    center.handle(run_frame("r1", "table"))
    assert link.final("r1")[0]["result"] == {1: "one"}  # not replaced by its repr
    assert seen == [("plexus-command:table", True)]


def test_slots_are_freed_once_per_run_so_limits_hold_run_after_run():
    release = threading.Event()
    center = CommandCenter(max_running=1)
    center.add(declare("once", lambda run: release.wait(5), concurrency="reject"))
    link = Attached(center)
    for run_id in ("r1", "r2", "r3"):  # one at a time: each finds the slot free
        release.set()
        center.handle(run_frame(run_id, "once"))
        assert link.final(run_id)[0]["state"] == "succeeded"
    assert (center._running, center._active) == (0, {"once": 0})
    release.clear()
    records: list[dict] = []
    center.on_outcome = records.append
    center.handle(run_frame("r4", "once"))
    center.handle(run_frame("r5", "once"))  # r4 still holds the command
    assert link.final("r5")[0]["error_message"] == "command already in progress: once"
    center.handle({"type": "typed_command", "id": "c1", "command": "once", "params": {}})
    assert legacy_answer(link, "c1")["error"] == "command already in progress: once"
    release.set()
    assert link.final("r4")[0]["state"] == "succeeded"
    assert [(r["run_id"], r["error_code"]) for r in records] == [
        ("r5", "busy"), ("c1", "busy"), ("r4", None)]


def test_a_run_without_an_expiry_starts_no_watchdog():
    others = set(expiry_watchdogs())
    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    link = Attached(center)
    frame = run_frame("r1")
    del frame["ttl_ms"]
    center.handle(frame)
    link.final("r1")
    assert center._watchdog is None
    assert not [t for t in expiry_watchdogs() if t not in others]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_handler_that_exits_the_interpreter_still_frees_its_slot():
    def leave(run):
        raise SystemExit(3)  # not an Exception: the handler's own answer never comes

    center = CommandCenter(max_running=1)
    center.add(declare("leave", leave))
    center.add(declare("inc", lambda run: 1))
    link = Attached(center)
    center.handle(run_frame("r1", "leave"))
    assert wait_until(lambda: center._running == 0, 5)
    center.handle(run_frame("r2", "inc"))
    assert link.final("r2")[0]["result"] == {"value": 1}


def test_adding_takes_only_declarations_and_each_name_once():
    from plexus.commands import CommandDeclarationError

    center = CommandCenter()
    with pytest.raises(CommandDeclarationError) as caught:
        center.add("reboot")
    assert str(caught.value) == ("expected a Command (see plexus.commands.declare), "
                                 "got 'reboot'")
    center.add(declare("reboot", lambda run: None))
    assert center.version == 1 and center.wants_link
    center.add(declare("halt", lambda run: None))
    center.add_legacy("old", lambda command, params: None)
    for name in ("reboot", "old"):
        with pytest.raises(CommandDeclarationError) as caught:
            center.add(declare(name, lambda run: None))
        assert str(caught.value) == f"command {name!r} is already declared"
    assert center.version == 3 and sorted(center.commands) == ["halt", "reboot"]


def test_a_run_that_finished_before_its_expiry_does_not_hide_the_next_one(monkeypatch):
    monkeypatch.setattr(commands, "WATCHDOG_SLICE_S", 30.0)  # the watchdog stays out of it
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    gates = {"r1": threading.Event(), "r2": threading.Event()}
    center.add(declare("hold", lambda run: gates[run.id].wait(5)))
    link = Attached(center)
    try:
        for run_id in ("r1", "r2"):
            center.handle({**run_frame(run_id, "hold"), "ttl_ms": 5000})
        gates["r1"].set()
        assert link.final("r1")[0]["state"] == "succeeded"
        clock.now += 5.0
        center.check_deadlines()  # r1 (finished) comes first in the list: r2 is still seen
        assert link.final("r2")[0]["error_code"] == "timeout"
    finally:
        gates["r2"].set()


def test_closing_ends_the_watchdog_at_once(monkeypatch):
    monkeypatch.setattr(commands, "WATCHDOG_IDLE_S", 30.0)  # it would not end on its own
    center = CommandCenter()
    center.add(declare("inc", lambda run: 1))
    link = Attached(center)
    center.handle(run_frame("r1"))
    link.final("r1")
    watchdog = center._watchdog
    assert watchdog is not None and watchdog.is_alive()
    center.close()
    watchdog.join(5)
    assert not watchdog.is_alive()


def test_a_legacy_result_once_sent_is_not_answered_again_at_expiry():
    clock = FakeClock(1000.0)
    center = CommandCenter(clock=clock)
    center.add(declare("inc", lambda run: 1))
    link = Attached(center)
    center.handle({"type": "typed_command", "id": "c1", "command": "inc", "params": {}})
    assert legacy_answer(link, "c1")["event"] == "result"
    clock.now += 30.0
    center.check_deadlines()
    assert [f["event"] for f in link.sent] == ["ack", "result"]


def test_an_unencodable_result_over_a_small_server_limit_is_left_out():
    center = CommandCenter()
    center.add(declare("odd", lambda run: {"long": "y" * 1000, "when": object()}))
    link = Attached(center, {"max_frame_bytes": 300})  # the 512-character repr does not fit
    center.handle(run_frame("r1", "odd"))
    assert link.final("r1")[0] == {"type": "command_status", "run_id": "r1", "seq": 3,
                                   "state": "succeeded"}


def test_a_status_exactly_at_the_servers_limit_is_sent_whole():
    import orjson

    from plexus.commands import CommandFailed

    def act(run, fail: bool):
        if fail:
            raise CommandFailed("refused", "m" * 100)
        return "x" * 100

    whole = {"ok": {"type": "command_status", "run_id": "r1", "seq": 3, "state": "succeeded",
                    "result": {"value": "x" * 100}},
             "failed": {"type": "command_status", "run_id": "r1", "seq": 3, "state": "failed",
                        "error_code": "refused", "error_message": "m" * 100}}
    for fail, key in ((False, "ok"), (True, "failed")):
        size = len(orjson.dumps(whole[key]))
        for limit, kept in ((size, True), (size - 1, False)):
            center = CommandCenter()
            center.add(declare("act", act, params={"fail": {"type": "boolean"}}))
            link = Attached(center, {"max_frame_bytes": limit})
            center.handle({**run_frame("r1", "act"), "params": {"fail": fail}})
            final = link.final("r1")[0]
            assert (final == whole[key]) is kept, (key, limit)
