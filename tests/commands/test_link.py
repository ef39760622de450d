"""The device link's own rules, each pinned exactly: backoff and pacing arithmetic,
the eviction hint, the frames it ignores or counts, what it refuses to send, and
how it reports itself. Most drive one DeviceLink method without a connection
(no thread, no socket); the rest run against the local receiver's /ws/device.

The checklist tests (test_checklist.py) show the protocol works; these pin the
numbers and messages, so that a changed constant or comparison does not pass.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import types

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from plexus import ConfigError
from plexus import link as link_module
from plexus.commands import CommandCenter
from plexus.link import (
    MAX_FRAME_BYTES,
    DeviceLink,
    _close_text,
    _describe,
    _json_object,
    _Pace,
    check_link_source_id,
    device_url,
    goodbye_delay,
    reconnect_delay,
)
from plexus.secret import Secret
from tests.commands.conftest import wait_until
from tests.commands.test_checklist import make_link
from tests.support import FakeClock


class FixedDraw:
    """A random source whose uniform() returns ``a + share * (b - a)`` and records its bounds."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return a + self.share * (b - a)


def no_wait(seconds: float) -> bool:
    """A reconnect wait that returns at once (never asks to stop)."""
    return False


def offline_link(center: CommandCenter | None = None, **kwargs) -> DeviceLink:
    """A link that is never started: its methods are driven one at a time."""
    return DeviceLink("ws://127.0.0.1:9", Secret("plx_offline_secret"), "pod-07",
                      center or CommandCenter(), **kwargs)


# Backoff ------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt,nominal", [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (10, 60)])
def test_backoff_is_2_to_the_n_capped_at_60_with_jitter_of_a_quarter(attempt, nominal):
    low, mid, high = FixedDraw(0.0), FixedDraw(0.5), FixedDraw(1.0)
    assert reconnect_delay(attempt, low) == pytest.approx(nominal * 0.75)
    assert reconnect_delay(attempt, mid) == pytest.approx(nominal * 1.0)
    assert reconnect_delay(attempt, high) == pytest.approx(nominal * 1.25)
    assert low.bounds == [(0.75, 1.25)]


def test_backoff_never_goes_under_a_tenth_of_a_second():
    never = FixedDraw(0.0)
    never.uniform = lambda a, b: 0.0  # a jitter of nothing at all
    assert reconnect_delay(0, never) == 0.1


def test_backoff_and_goodbye_without_a_random_source_use_the_module_one():
    state = random.getstate()  # other tests' draws stay as they were
    try:
        random.seed(11)
        expected = 4 * random.uniform(0.75, 1.25)
        random.seed(11)
        assert reconnect_delay(2) == expected
        random.seed(12)
        expected = random.uniform(0.1, 0.5)
        random.seed(12)
        assert goodbye_delay() == expected
    finally:
        random.setstate(state)


def test_goodbye_waits_between_a_tenth_and_half_a_second():
    draw = FixedDraw(1.0)
    assert goodbye_delay(draw) == 0.5
    assert draw.bounds == [(0.1, 0.5)]


def test_the_link_backs_off_with_its_seeded_random_source_and_caps_the_exponent(
        plexus_receiver_factory):
    """Attempts count up to MAX_ATTEMPT (10) and stay there: 2**10 is capped at 60 s."""
    rx = plexus_receiver_factory(api_keys=["plx_good"])
    asked: list[float] = []
    link = DeviceLink(rx.ws_url, Secret("plx_wrong"), "pod-07", CommandCenter(),
                      wait=lambda seconds: asked.append(seconds) or False,
                      rng=random.Random(5))
    link.start()
    try:
        assert wait_until(lambda: len(asked) >= 13, 20)
    finally:
        link.stop()
    rng = random.Random(5)
    expected = [max(0.1, min(2.0 ** min(n, 10), 60.0) * rng.uniform(0.75, 1.25))
                for n in range(13)]
    assert asked[:13] == expected
    assert list(link.delays)[:13] == expected
    assert link.reconnects >= 13


# Pacing -------------------------------------------------------------------------------
def test_the_pace_lets_a_burst_through_then_one_frame_per_token(monkeypatch):
    clock = FakeClock(100.0)
    monkeypatch.setattr(link_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    pace = _Pace(2, 4.0)
    assert [pace.delay(), pace.delay()] == [0.0, 0.0]  # the burst
    assert pace.delay() == pytest.approx(0.25)          # no token: 1 / rate
    clock.now += 0.125                                  # half a token back
    assert pace.delay() == pytest.approx(0.125)
    clock.now += 0.125                                  # exactly one token: it goes
    assert pace.delay() == 0.0
    clock.now += 60                                     # idle: refilled to the burst, no more
    assert [pace.delay(), pace.delay()] == [0.0, 0.0]
    assert pace.delay() == pytest.approx(0.25)


def test_the_pace_follows_the_generation_announced(plexus_receiver_factory):
    for generation, burst, rate in (("hosted", 500, 500.0), ("oss", 50, 18.0)):
        rx = plexus_receiver_factory(ws_generation=generation)
        link = make_link(rx)
        link.start()
        try:
            assert link.wait_up(10)
            assert (link.hosted, link._pace.burst, link._pace.rate) == \
                (generation == "hosted", burst, rate)
        finally:
            link.stop()


# The eviction hint ----------------------------------------------------------------------
def test_three_short_lived_connections_warn_once_with_the_source_id(caplog):
    link = offline_link()
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link._check_eviction(9.99)
    link._check_eviction(0.0)
    assert caplog.text == ""
    link._check_eviction(5.0)
    assert caplog.messages == [
        "the platform closed the device link 3 times within 10 s of opening it: another "
        "process is probably connected with source_id 'pod-07' (the platform keeps one link "
        "per source id, so each evicts the other); give each process its own source_id"]
    link._check_eviction(1.0)
    assert len(caplog.messages) == 1  # once per streak


def test_ten_seconds_is_not_short_and_a_minute_ends_the_streak(caplog):
    link = offline_link()
    caplog.set_level(logging.WARNING, logger="plexus.link")
    for lifetime in (10.0, 59.99, 10.0):  # neither short nor long: the streak stands
        link._check_eviction(1.0)
        link._check_eviction(lifetime)
    assert link._short_lived == 3 and len(caplog.messages) == 1
    link._check_eviction(60.0)  # a connection that lasted: start over, and warn again
    assert link._short_lived == 0
    for _ in range(2):
        link._check_eviction(1.0)
    assert len(caplog.messages) == 1
    link._check_eviction(1.0)
    assert len(caplog.messages) == 2


# Reporting ------------------------------------------------------------------------------
def test_a_problem_is_warned_once_until_it_changes(caplog):
    link = offline_link()
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    for message in ("down: A", "down: A", "down: B", "down: A"):
        link._problem(message)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert warnings == ["down: A; retrying with backoff", "down: B; retrying with backoff",
                        "down: A; retrying with backoff"]
    assert debug == ["down: A"]
    assert link.last_error == "down: A"


def test_status_and_repr_name_the_link_never_the_key():
    link = offline_link()
    assert link.status() == {"state": "off", "url": "ws://127.0.0.1:9/ws/device",
                             "since": None, "reconnects": 0, "clock_offset": None,
                             "last_error": None}
    text = repr(link)
    assert text.startswith("DeviceLink(url='ws://127.0.0.1:9/ws/device', source_id='pod-07', "
                           "state='off', api_key=")
    assert "plx_offline_secret" not in text


def test_close_text_and_describe():
    assert _close_text(ConnectionClosed(Close(1001, "going away"), None)) == \
        "close 1001: going away"
    assert _close_text(ConnectionClosed(Close(1000, ""), None)) == "close 1000"
    assert _close_text(ConnectionClosed(None, None)) == "no close frame"
    assert _describe(OSError("refused")) == "OSError: refused"
    assert _describe(TimeoutError()) == "TimeoutError: TimeoutError"
    long = _describe(ValueError("x" * 400))
    assert len(long) == 300 and long.startswith("ValueError: xxx")


def test_only_json_objects_are_frames():
    assert _json_object('{"type": "a"}') == {"type": "a"}
    assert _json_object(b'{"type": "a"}') == {"type": "a"}
    for raw in ("[1]", "3", "not json", b"\xff", None, 7):
        assert _json_object(raw) is None


def test_urls_and_source_ids_are_checked_exactly():
    assert device_url("  WSS://h/  ") == "WSS://h/ws/device"
    assert device_url("ws://BOX//") == "ws://BOX/ws/device"  # only slashes are trimmed
    assert device_url("ws://h/ws/device/") == "ws://h/ws/device"  # the path is not doubled
    with pytest.raises(ConfigError) as refused:
        device_url("http://h")
    assert str(refused.value) == \
        "the device link URL must start with ws:// or wss://, got 'http://h'"
    assert check_link_source_id("pod-07") == "pod-07"
    assert check_link_source_id("a" * 256) == "a" * 256
    with pytest.raises(ConfigError) as refused:
        check_link_source_id("123e4567-e89b-12d3-a456-426614174000")
    assert str(refused.value) == (
        "source_id '123e4567-e89b-12d3-a456-426614174000' looks like a UUID, which the "
        "device link refuses (the platform uses UUIDs for its own ids): choose a name such "
        "as 'pod-07'")
    with pytest.raises(ConfigError) as refused:
        check_link_source_id("Pod 07")
    assert str(refused.value) == (
        "source_id 'Pod 07' is invalid: use lower-case letters, digits, '.', '_' and '-', "
        "starting with a letter or digit (pattern ^[a-z0-9][a-z0-9._-]*$)")
    assert check_link_source_id("123e4567-e89b-12d3-a456-42661417400") is not None  # one short


# Frames in ----------------------------------------------------------------------------
class RecordingCenter(CommandCenter):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.seen: list[dict] = []
        self.fail = fail

    def handle(self, frame):
        self.seen.append(frame)
        if self.fail:
            raise RuntimeError("a bug in a command")
        return super().handle(frame)


def test_incoming_frames_are_counted_ignored_or_passed_on(caplog):
    center = RecordingCenter()
    link = offline_link(center)
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    for raw in (b'{"type": "command_run"}', "not json", "[1]"):
        link._on_frame(raw)
    assert (link.frames_in, link.ignored, center.seen) == (3, 3, [])
    for kind in ("authenticated", "telemetry_ack", "pong"):
        link._on_frame(f'{{"type": "{kind}"}}')
    assert (link.frames_in, link.ignored, center.seen) == (6, 3, [])
    link._on_frame('{"type": "future_frame"}')
    assert center.seen == [{"type": "future_frame"}] and link.ignored == 4
    assert "ignored a frame of unknown type 'future_frame'" in caplog.messages


def test_error_frames_are_counted_and_logged_with_code_and_detail(caplog):
    center = RecordingCenter()
    link = offline_link(center)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link._on_frame('{"type": "error", "code": "RATE_LIMITED", "detail": "slow down"}')
    link._on_frame('{"type": "error", "message": "bad frame"}')
    link._on_frame('{"type": "error"}')
    assert caplog.messages == [
        "the platform answered a frame with an error: RATE_LIMITED slow down",
        "the platform answered a frame with an error:  bad frame",
        "the platform answered a frame with an error:  "]
    assert (link.server_errors, link.ignored, center.seen) == (3, 0, [])


def test_a_command_that_raises_is_logged_and_the_link_goes_on(caplog):
    link = offline_link(RecordingCenter(fail=True))
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link._on_frame('{"type": "command_run", "run_id": "r1"}')
    link._on_frame('{"type": "command_run", "run_id": "r2"}')
    failures = [r for r in caplog.records if r.getMessage() == "handling a command_run frame failed"]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
    assert link.ignored == 0 and link.frames_in == 2


# Frames out ---------------------------------------------------------------------------
def test_nothing_is_queued_while_the_link_is_down():
    link = offline_link()
    assert link.send({"type": "x"}) is False
    assert list(link._out) == []


def test_frames_up_to_one_mib_are_queued_and_bigger_ones_refused(caplog):
    link = offline_link()
    link._up = True  # as after authentication
    caplog.set_level(logging.ERROR, logger="plexus.link")
    envelope = len(b'{"type":"big","pad":""}')
    assert link.send({"type": "big", "pad": "x" * (MAX_FRAME_BYTES - envelope)}) is True
    assert len(link._out[0]) == MAX_FRAME_BYTES
    assert link.send({"type": "big", "pad": "x" * (MAX_FRAME_BYTES - envelope + 1)}) is False
    assert caplog.messages == [
        f"a big frame of {MAX_FRAME_BYTES + 1} bytes was not sent: the link carries at most "
        f"{MAX_FRAME_BYTES}"]
    assert link.send({"type": "keys", 7: "seven"}) is True  # non-string keys as text
    assert link._out[-1] == b'{"type":"keys","7":"seven"}'
    assert link.send({"type": "odd", "value": object()}) is False
    assert caplog.messages[-1] == \
        "a odd frame could not be encoded and was dropped: Type is not JSON serializable: object"
    assert len(link._out) == 2


# Up and down --------------------------------------------------------------------------
def test_the_link_says_which_protocol_came_up_and_when_it_recovered(plexus_receiver_factory,
                                                                   caplog):
    rx = plexus_receiver_factory(ws_generation="oss")
    rx.device.refuse_auth_next(1)
    link = make_link(rx, wait=no_wait)
    caplog.set_level(logging.INFO, logger="plexus.link")
    link.start()
    try:
        assert link.wait_up(10)
        assert link.status()["state"] == "up" and link.last_error is None
        assert link.connected_since is not None
    finally:
        link.stop()
    assert f"device link to {link.url} is up again" in caplog.messages
    rx2 = plexus_receiver_factory()
    link = make_link(rx2)
    caplog.clear()
    link.start()
    try:
        assert link.wait_up(10)
    finally:
        link.stop()
    assert f"device link to {link.url} is up (hosted protocol)" in caplog.messages
    assert link.state == "stopped" and link.connected_since is None


@pytest.mark.parametrize("skew_ms,words", [(7_500, "7.5 s behind"), (-7_500, "7.5 s ahead of")])
def test_a_clock_off_the_platforms_is_named_with_its_direction(rx, caplog, skew_ms, words):
    rx.device.clock_skew_ms = skew_ms
    link = make_link(rx)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link.start()
    try:
        assert link.wait_up(10)
    finally:
        link.stop()
    assert any(m.startswith(f"this computer's clock is {words} the platform's")
               for m in caplog.messages), caplog.messages
    assert link.clock_offset == pytest.approx(skew_ms / 1000, abs=0.3)


def test_heartbeats_carry_the_source_version_and_uptime(rx):
    from plexus import __version__

    link = make_link(rx, heartbeat_interval=0.2)
    link.start()
    try:
        assert link.wait_up(10)
        beats = rx.device.wait_frame(lambda f: f.type == "heartbeat", count=2, timeout=5)
    finally:
        link.stop()
    first, second = beats[0].frame, beats[1].frame
    assert set(first) == {"type", "source_id", "agent_version", "uptime_s"}
    assert first["agent_version"] == __version__
    assert 0 < first["uptime_s"] < second["uptime_s"] < 30
    assert all(round(b["uptime_s"], 1) == b["uptime_s"] for b in (first, second))  # tenths
    assert link.frames_out >= 2


# Announcing commands declared later ---------------------------------------------------------
def test_a_command_declared_while_up_is_announced_by_reconnecting_at_once(rx):
    from plexus.commands import declare

    center = CommandCenter()
    center.add(declare("first", lambda run: None))
    asked: list[float] = []
    link = make_link(rx, center, wait=lambda seconds: asked.append(seconds) or False)
    link.start()
    try:
        assert link.wait_up(10)
        link.reannounce()  # nothing new: the link stays as it is
        time.sleep(0.3)
        assert rx.device.connections == 1 and link.up
        center.add(declare("second", lambda run: None))
        link.reannounce()
        assert rx.device.wait_connected(connections=2, timeout=10)
        assert link.wait_up(10)
    finally:
        link.stop()
    assert [c["name"] for c in rx.device.auths[-1]["commands"]] == ["first", "second"]
    assert asked == [] and list(link.delays) == [0.0]  # no wait, and not a failure
    assert link.last_error is None


def test_nothing_is_reannounced_while_the_link_is_down():
    from plexus.commands import declare

    center = CommandCenter()
    link = offline_link(center)
    center.add(declare("first", lambda run: None))
    link.reannounce()
    assert link._reannounce is False


def test_a_frame_sent_as_the_link_goes_down_is_refused_not_queued():
    """The link may go down between send()'s first look and its taking the queue's lock."""
    import threading

    link = offline_link()
    link._up = True
    result: list[bool] = []
    with link._out_cond:  # the queue is busy: send() passes its first check and waits
        sender = threading.Thread(target=lambda: result.append(link.send({"type": "late"})))
        sender.start()
        time.sleep(0.2)
        link._up = False  # the connection ended meanwhile
    sender.join(5)
    assert result == [False] and list(link._out) == []


# The authenticated reply ---------------------------------------------------------------------
@pytest.mark.parametrize("server_ms", [True, "1700000000000", 0, -5, None, [1]])
def test_only_a_positive_number_of_milliseconds_is_taken_as_the_platforms_time(server_ms):
    link = offline_link()
    link._on_authenticated({"type": "authenticated", "server_time_ms": server_ms})
    assert link.clock_offset is None and link.up and link.state == "up"


def test_the_smallest_platform_time_is_still_a_time():
    link = offline_link()
    link._on_authenticated({"type": "authenticated", "server_time_ms": 1})
    assert link.clock_offset is not None and link.clock_offset < -1e9  # 1970 is far behind


class ClosingFails:
    def close(self) -> None:
        raise OSError("already gone")


def test_a_socket_that_fails_to_close_is_noted_and_forgotten(caplog):
    link = offline_link()
    link._ws = ClosingFails()
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link._drop(polite=False)
    assert caplog.messages == ["device link: close failed: already gone"]
    assert link._ws is None


def test_the_clock_offset_is_in_seconds():
    link = offline_link()
    link._on_authenticated({"type": "authenticated",
                            "server_time_ms": time.time() * 1000.0 + 1_000_000})
    assert link.clock_offset == pytest.approx(1000.0, abs=0.5)


class RecordingClock:
    """A clock that records what the link tells it (``platform_time`` as given)."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)
        self.observed: list[tuple] = []

    def mono_ns(self) -> int:
        return 42

    def observe(self, *args: object, **kwargs: object) -> None:
        self.observed.append((*args, kwargs))


@pytest.mark.parametrize("attributes", [{}, {"platform_time": False}])
def test_a_clock_that_does_not_follow_the_platform_is_told_nothing(attributes, caplog):
    clock = RecordingClock(**attributes)
    link = offline_link(clock=clock)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link._on_authenticated({"type": "authenticated",
                            "server_time_ms": time.time() * 1000.0 + 60_000})
    assert clock.observed == []
    assert caplog.messages[0].startswith("this computer's clock is 60.0 s behind the platform's")


def test_a_clock_that_follows_the_platform_is_given_the_servers_stamp(caplog):
    clock = RecordingClock(platform_time=True)
    link = offline_link(clock=clock)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link._auth_sent = 7
    link._on_authenticated({"type": "authenticated", "server_time_ms": 1_700_000_000_123})
    assert clock.observed == [("device-link", 1_700_000_000_123_000_000, 7, 42,
                               {"resolution_ns": 1_000_000})]
    assert caplog.messages == []  # the clock says what it does about the difference


# Messages and edges of the connection ---------------------------------------------------
def test_the_clock_warning_starts_past_three_seconds_and_says_what_to_do(monkeypatch, caplog):
    now = 1_700_000_000.0
    monkeypatch.setattr(link_module, "time", types.SimpleNamespace(
        time=lambda: now, monotonic=lambda: 5.0))
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link = offline_link()
    link._on_authenticated({"type": "authenticated", "server_time_ms": now * 1000 + 3000})
    assert link.clock_offset == 3.0 and caplog.messages == []  # exactly 3 s: in step
    link._on_authenticated({"type": "authenticated", "server_time_ms": now * 1000 - 3500})
    assert caplog.messages == [
        "this computer's clock is 3.5 s ahead of the platform's; timestamps it makes are off "
        "by as much (set up NTP, e.g. systemd-timesyncd or chrony)"]


def test_a_legacy_platform_is_named_when_the_link_comes_up(oss_rx, caplog):
    link = make_link(oss_rx)
    caplog.set_level(logging.INFO, logger="plexus.link")
    link.start()
    try:
        assert link.wait_up(10)
        for name in ("plexus-link", "plexus-link-writer"):  # never hold the process open
            threads = [t for t in threading.enumerate() if t.name == name]
            assert len(threads) == 1 and threads[0].daemon, name
    finally:
        link.stop()
    assert f"device link to {link.url} is up (legacy protocol)" in caplog.messages


def test_a_goodbye_and_a_drop_are_told_apart_in_the_log(rx, caplog):
    link = make_link(rx, wait=no_wait)
    caplog.set_level(logging.INFO, logger="plexus.link")
    link.start()
    try:
        assert link.wait_up(10)
        rx.device.close(1001, "going away")
        assert rx.device.wait_connected(connections=2, timeout=10) and link.wait_up(10)
        assert "device link: server closed the link (close 1001: going away); reconnecting" \
            in caplog.messages
        rx.device.drop()
        assert rx.device.wait_connected(connections=3, timeout=10)
        assert wait_until(lambda: link.up, 10)
        rx.device.close(1001, "going away")  # a goodbye after the recovery: a plain up
        assert rx.device.wait_connected(connections=4, timeout=10)
        assert wait_until(lambda: link.up, 10)
    finally:
        link.stop()
    assert (f"device link to {link.url} dropped (no close frame); retrying with backoff"
            in caplog.messages)
    ups = [m for m in caplog.messages if m.startswith(f"device link to {link.url} is up")]
    assert ups == [f"device link to {link.url} is up (hosted protocol)"] * 2 + [
        f"device link to {link.url} is up again",
        f"device link to {link.url} is up (hosted protocol)"]


class SendFails:
    def send(self, text: str) -> None:
        raise OSError("connection reset")


def test_a_send_that_fails_ends_the_writer_and_is_noted(caplog):
    link = offline_link()
    link._up = True
    link._out.append(b'{"type":"x"}')
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link._write(SendFails())  # returns: the reader notices the closed connection
    assert caplog.messages == ["device link: send failed: connection reset"]
    assert link.frames_out == 0


def test_each_new_attempt_shows_as_connecting(rx):
    rx.device.ignore_auth_next(2)
    link = make_link(rx, wait=no_wait, auth_timeout=1.5)  # the 2nd attempt waits 1.5 s
    link.start()
    try:
        assert wait_until(lambda: link.connections == 2, 10)
        assert link.state == "connecting"  # the second attempt, waiting for its reply
        assert link.wait_up(10)
    finally:
        link.stop()


def test_three_connections_closed_soon_after_auth_bring_the_eviction_hint(rx, caplog):
    link = make_link(rx, wait=no_wait)
    caplog.set_level(logging.WARNING, logger="plexus.link")
    link.start()
    try:
        for n in range(1, 4):
            assert rx.device.wait_connected(connections=n, timeout=10) and link.wait_up(10)
            rx.device.close(1000, "evicted")
        assert rx.device.wait_connected(connections=4, timeout=10)
    finally:
        link.stop()
    assert [m for m in caplog.messages if "another process is probably connected" in m] == [
        "the platform closed the device link 3 times within 10 s of opening it: another "
        "process is probably connected with source_id 'pod-07' (the platform keeps one link "
        "per source id, so each evicts the other); give each process its own source_id"]



# The connection and writer threads, driven without a socket ----------------------------------
def test_start_says_connecting_at_once_and_stop_waits_no_longer_than_asked():
    link = offline_link()
    release = threading.Event()
    link._main = lambda: release.wait(5)  # a connection thread that ignores stop()
    link.start()
    try:
        assert link.status()["state"] == "connecting"  # before the thread has said anything
        assert (link._thread.name, link._thread.daemon) == ("plexus-link", True)
        link.stop(timeout=0.1)
        assert link._thread.is_alive() and link.state == "stopped"
    finally:
        release.set()


class RecordingSocket:
    """A socket that records what is sent and takes the link down after ``count`` frames."""

    def __init__(self, link: DeviceLink, count: int) -> None:
        self.link, self.count = link, count
        self.sent: list[str] = []

    def send(self, text: str) -> None:
        self.sent.append(text)
        if len(self.sent) >= self.count:
            self.link._up = False


def test_the_writer_sends_queued_frames_in_order_and_counts_each_once():
    link = offline_link()
    link._up = True
    link._out.extend([b'{"type":"a"}', b'{"type":"b"}'])
    ws = RecordingSocket(link, count=2)
    link._write(ws)
    assert ws.sent == ['{"type":"a"}', '{"type":"b"}'] and link.frames_out == 2


class DownWhilePacing:
    """A pace that asks the writer to wait three times; the link goes down at the first."""

    def __init__(self, link: DeviceLink) -> None:
        self.link, self.calls = link, 0

    def delay(self) -> float:
        self.calls += 1
        if self.calls == 1:
            self.link._up = False
        return 0.01 if self.calls <= 3 else 0.0


def test_a_frame_waiting_for_its_turn_is_not_sent_once_the_link_is_down():
    link = offline_link()
    link._up = True
    link._out.append(b'{"type":"a"}')
    link._pace = DownWhilePacing(link)
    ws = RecordingSocket(link, count=1)
    link._write(ws)
    assert ws.sent == [] and link.frames_out == 0 and link._pace.calls == 1


class RecordingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


def test_the_writer_waits_no_longer_than_the_time_to_the_next_heartbeat():
    link = offline_link(heartbeat_interval=0.2)
    link._up = True
    link._out_cond = RecordingCondition()
    ws = RecordingSocket(link, count=2)
    link._write(ws)
    assert [orjson.loads(text)["type"] for text in ws.sent] == ["heartbeat", "heartbeat"]
    waits = link._out_cond.waits
    assert waits and all(0.0 <= w <= 0.2 for w in waits)


def test_kept_statuses_with_number_keys_are_replayed_when_the_link_comes_up():
    from plexus.commands import declare

    center = CommandCenter()
    center.add(declare("table", lambda run: {1: "one"}))
    center.handle({"type": "command_run", "run_id": "r1", "command": "table", "params": {}})
    assert wait_until(lambda: center.kept == 3, 5)  # acknowledged, running, succeeded
    link = offline_link(center)
    link._on_authenticated({"type": "authenticated"})
    replay = [orjson.loads(data) for data in link._out]
    assert replay[0]["type"] == "command_sync"
    assert replay[-1]["result"] == {"1": "one"} and len(replay) == 4


def test_a_command_declared_while_device_auth_was_on_its_way_is_announced_at_once():
    from plexus.commands import declare

    center = CommandCenter()
    link = offline_link(center)
    link._announced = center.version  # what device_auth carried
    center.add(declare("late", lambda run: None))
    link._on_authenticated({"type": "authenticated"})
    assert link._reannounce is True


class EndingSocket:
    """A connection the server ends: recv() raises ConnectionClosed (with the server's
    close frame, or none: a drop) once the writer is running; send() may hang."""

    def __init__(self, close: Close | None, hang_send: threading.Event | None = None) -> None:
        self.close_frame, self.hang_send = close, hang_send
        self.writer: threading.Thread | None = None
        self.sending = threading.Event()

    def recv(self) -> str:
        self.writer = next(t for t in threading.enumerate() if t.name == "plexus-link-writer")
        if self.hang_send is not None:
            assert self.sending.wait(5)
        raise ConnectionClosed(self.close_frame, None)

    def send(self, text: str) -> None:
        self.sending.set()
        if self.hang_send is not None:
            self.hang_send.wait(5)


class LinkStateAtLog(logging.Handler):
    """Notes, at each log record, whether the link would still take a frame."""

    def __init__(self, link: DeviceLink) -> None:
        super().__init__()
        self.link = link
        self.taken: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.taken.append((record.getMessage(), self.link.send({"type": "late"})))


@pytest.mark.parametrize("close,goodbye,error,said", [
    (Close(1001, "restarting"), True, "server closed the link (close 1001: restarting)",
     "device link: server closed the link (close 1001: restarting); reconnecting"),
    (None, False, "device link to ws://127.0.0.1:9/ws/device dropped (no close frame)",
     "device link to ws://127.0.0.1:9/ws/device dropped (no close frame); "
     "retrying with backoff")])
def test_a_closed_connection_stops_the_writer_before_it_is_reported(close, goodbye, error,
                                                                     said):
    link = offline_link()
    link._up = True
    ws = EndingSocket(close)
    watcher = LinkStateAtLog(link)
    logger = logging.getLogger("plexus.link")
    logger.addHandler(watcher)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert link._serve(ws) is goodbye
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)
    assert watcher.taken == [(said, False)]  # told only once no frame is taken any more
    assert link.last_error == error
    assert ws.writer is not None and ws.writer.daemon and not ws.writer.is_alive()


def test_a_writer_stuck_in_a_send_does_not_hold_the_connection_end(monkeypatch):
    monkeypatch.setattr(link_module, "WRITER_JOIN_S", 0.05)
    link = offline_link()
    link._up = True
    link._out.append(b'{"type":"a"}')
    release = threading.Event()
    ws = EndingSocket(None, hang_send=release)
    try:
        assert link._serve(ws) is False
        assert ws.writer is not None and ws.writer.is_alive()  # still in its send
    finally:
        release.set()


def test_only_the_first_connection_after_a_problem_says_up_again(caplog):
    link = offline_link()
    caplog.set_level(logging.INFO, logger="plexus.link")
    link._problem("device link to ws://127.0.0.1:9/ws/device failed: refused")
    for _ in range(2):
        link._on_authenticated({"type": "authenticated"})
    assert caplog.messages[-2:] == [
        "device link to ws://127.0.0.1:9/ws/device is up again",
        "device link to ws://127.0.0.1:9/ws/device is up (legacy protocol)"]


# Opening and authenticating, driven without a server -----------------------------------------
def test_a_new_link_starts_off_with_the_documented_defaults():
    link = DeviceLink("ws://127.0.0.1:9", None, "pod-07", CommandCenter())
    assert link.status() == {"state": "off", "url": "ws://127.0.0.1:9/ws/device",
                             "since": None, "reconnects": 0, "clock_offset": None,
                             "last_error": None}
    assert (link.agent_version, link.platform, link.verify_tls, link.heartbeat_interval,
            link.auth_timeout, link.connect_timeout) == ("0", "plexus-gateway", True, 30.0,
                                                         10.0, 10.0)
    assert (link.connections, link.frames_in, link.frames_out, link.ignored,
            link.server_errors, link.hosted, link.up) == (0, 0, 0, 0, 0, False, False)
    assert link.delays.maxlen == 64 and list(link.delays) == []
    assert (link._pace.burst, link._pace.rate, link._pace.tokens) == (50, 18.0, 50.0)
    assert link._announced == -1 and link._wait == link._stopping.wait


class ScriptedSocket:
    """A socket for _authenticate: records what is sent and answers recv() from a script
    (a text, or an exception to raise)."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.sent: list[dict] = []
        self.recv_timeouts: list[float] = []

    def send(self, text: str) -> None:
        self.sent.append(orjson.loads(text))

    def recv(self, timeout: float) -> str:
        self.recv_timeouts.append(timeout)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


def test_device_auth_says_who_we_are_and_what_we_offer():
    from plexus.commands import declare

    center = CommandCenter()
    link = offline_link(center, agent_version="1.2.3", platform="rig", auth_timeout=0.7)
    ws = ScriptedSocket('{"type": "authenticated"}')
    link._authenticate(ws)
    assert ws.sent == [{"type": "device_auth", "api_key": "plx_offline_secret",
                        "source_id": "pod-07", "platform": "rig", "agent_version": "1.2.3",
                        "protocol": 1, "hears_goodbye": True, "acks": True}]
    assert ws.recv_timeouts == [0.7] and link.up and link._announced == 0
    center.add(declare("ping", lambda run: "pong"))
    keyless = DeviceLink("ws://127.0.0.1:9", None, "pod-07", center)
    ws = ScriptedSocket('{"type": "authenticated"}')
    keyless._authenticate(ws)
    assert ws.sent[0]["api_key"] == "" and [c["name"] for c in ws.sent[0]["commands"]] == [
        "ping"]
    assert keyless._announced == 1


class StampingClock:
    platform_time = False

    def mono_ns(self) -> int:
        return 42


def test_device_auth_notes_when_it_went_out_on_the_clock():
    link = offline_link(clock=StampingClock())
    link._authenticate(ScriptedSocket('{"type": "authenticated"}'))
    assert link._auth_sent == 42


@pytest.mark.parametrize("reply,reason", [
    (TimeoutError(), "no answer to device_auth within 0.5 s"),
    (ConnectionClosed(Close(1008, "bad key"), None),
     "closed during authentication (close 1008: bad key)"),
    (ConnectionClosed(None, None), "closed during authentication (no close frame)"),
    ('{"type": "error", "message": "Invalid API key", "detail": "d", "code": "c"}',
     "Invalid API key"),
    ('{"type": "error", "detail": "the detail", "code": "c"}', "the detail"),
    ('{"type": "error", "code": "AUTH_FAILED"}', "AUTH_FAILED"),
    ('{"type": "error"}', "None"),
    ('{"type": "error", "message": "' + "m" * 300 + '"}', "m" * 200),
    ('{"type": "pong"}', "unexpected first reply '{\"type\": \"pong\"}'"),
    ("x" * 100, "unexpected first reply '" + "x" * 80 + "'"),
    ("[1]", "unexpected first reply '[1]'"),
])
def test_a_refused_or_strange_answer_to_device_auth_is_named(reply, reason):
    link = offline_link(auth_timeout=0.5)
    with pytest.raises(link_module._AuthRefused) as refused:
        link._authenticate(ScriptedSocket(reply))
    assert str(refused.value) == reason and not link.up


def test_connecting_asks_websockets_for_exactly_what_the_link_needs(monkeypatch):
    import ssl

    import websockets.sync.client

    from plexus import __version__

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(websockets.sync.client, "connect",
                        lambda url, **kwargs: calls.append((url, kwargs)) or "socket")
    plain = offline_link(connect_timeout=3.5)
    assert plain._connect() == "socket" and plain.connections == 1
    url, kwargs = calls[0]
    assert url == "ws://127.0.0.1:9/ws/device"
    assert kwargs == {"open_timeout": 3.5, "close_timeout": 2.0, "max_size": MAX_FRAME_BYTES,
                      "ping_interval": None,
                      "user_agent_header": f"plexus-gateway/{__version__}", "ssl": None}
    plain._connect()
    assert plain.connections == 2  # counted per connection
    for verify, checked in ((True, None), (False, ssl.CERT_NONE)):
        link = DeviceLink("WSS://example.test", None, "pod-07", CommandCenter(),
                          verify_tls=verify)
        link._connect()
        context = calls[-1][1]["ssl"]
        if checked is None:
            assert context is None  # websockets' own default: verified
        else:
            assert (context.check_hostname, context.verify_mode) == (False, checked)


def test_stopping_a_link_that_never_started_closes_nothing_and_says_nothing(caplog):
    link = offline_link()
    caplog.set_level(logging.DEBUG, logger="plexus.link")
    link.stop()
    assert link.state == "stopped" and caplog.messages == []


# The connection loop, driven without a server ------------------------------------------------
class OpenedSocket:
    """What _connect returns: a context manager the loop enters and closes."""

    def __enter__(self) -> OpenedSocket:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def close(self) -> None:
        pass


def one_attempt_link(**kwargs) -> DeviceLink:
    """A link whose first wait to reconnect asks it to stop, drawing the middle of each
    backoff range."""
    return offline_link(wait=lambda seconds: True, rng=FixedDraw(0.5), **kwargs)


def test_a_failed_connection_is_named_counted_and_backed_off():
    link = one_attempt_link()

    def refuse():
        raise ConnectionRefusedError("Connection refused")

    link._connect = refuse
    link._main()
    assert link.last_error == ("device link to ws://127.0.0.1:9/ws/device failed: "
                               "ConnectionRefusedError: Connection refused")
    assert (link.state, link.reconnects, list(link.delays)) == ("stopped", 1, [1.0])


def test_a_refused_device_auth_is_named_as_the_platforms_refusal():
    link = one_attempt_link()
    link._connect = OpenedSocket

    def refused(ws):
        raise link_module._AuthRefused("Invalid API key")

    link._authenticate = refused
    link._main()
    assert link.last_error == "the platform refused the device link: Invalid API key"
    assert link.state == "stopped"


def test_stopping_during_an_attempt_ends_the_loop_without_a_problem():
    link = one_attempt_link()

    def stopped_meanwhile():
        link._stopping.set()
        raise ConnectionResetError("closed by stop()")

    link._connect = stopped_meanwhile
    link._main()
    assert (link.state, link.last_error, link.reconnects) == ("stopped", None, 0)


def test_a_reannounce_reconnects_at_once_only_the_first_time():
    link = one_attempt_link()
    link._reannounce = True
    attempts: list[int] = []

    def refuse():
        attempts.append(1)
        if len(attempts) >= 3:
            link._stopping.set()  # a guard: the loop must not spin
        raise ConnectionRefusedError("Connection refused")

    link._connect = refuse
    link._main()
    assert list(link.delays) == [0.0, 1.0] and len(attempts) == 2
    assert not link._reannounce  # only its truth is read


def test_a_goodbye_waits_its_own_short_delay_and_the_link_says_waiting_meanwhile():
    states: list[str] = []
    link = offline_link(wait=lambda seconds: states.append(link.state) or True,
                        rng=FixedDraw(0.5))
    link._connect = OpenedSocket
    link._authenticate = lambda ws: None
    link._serve = lambda ws: True  # the server said goodbye
    link._main()
    assert list(link.delays) == [pytest.approx(0.3)]  # the middle of 0.1 to 0.5 s
    assert states == ["waiting"] and link.state == "stopped"


def test_a_heartbeats_uptime_is_in_tenths_of_a_second():
    link = offline_link(heartbeat_interval=0.0)  # the first heartbeat goes at once
    link._up = True
    link._started = time.monotonic() - 12.341
    ws = RecordingSocket(link, count=1)
    link._write(ws)
    uptime = orjson.loads(ws.sent[0])["uptime_s"]
    assert uptime == round(uptime, 1) and 12.3 <= uptime <= 12.5  # 12.3 unless delayed
