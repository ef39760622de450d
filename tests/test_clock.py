"""Clock safety (plexus.clock) with an injected clock: which timeline stamps, what waits, steps.

Every test here drives a :class:`ManualTime` that moves only when told to,
and calls ``Clock.check()`` itself where the clock's thread would, so the
stamps are exact. The replays through real peers (the local receiver, a pty,
MAVLink over UDP, the device WebSocket) are in tests/test_clock_replay.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from plexus.buffer import MemoryBuffer
from plexus.clock import BUILD_DATE_S, Clock, ManualTime, system_clock_behind_s
from plexus.errors import ValidationError
from plexus.pipeline import Lane, Pipeline
from plexus.point import Point, timestamp_ms
from plexus.sinks.base import SendResult, Sink

DAY = 86_400.0
# "Today" in these tests: the real date (explicit timestamps are checked against the real
# system clock), and after the build date in any case.
NOW = float(int(max(time.time(), BUILD_DATE_S + DAY)))
E9 = 1_000_000_000


class NullSink(Sink):
    type_name = "null"

    def send(self, points: list[Point], key: str) -> SendResult:
        return SendResult(len(points))


def make(wall_s: float, **clock_options: object) -> tuple[ManualTime, Clock, Pipeline, Lane]:
    # A floor a year back (the build date may be days ago only): "3 days behind" is plausible.
    clock_options.setdefault("not_before", NOW - 365 * DAY)
    fake = ManualTime(wall_s, running=False)
    clock = Clock(fake, **clock_options)  # type: ignore[arg-type]
    pipeline = Pipeline("rig-01", clock=clock)
    lane = pipeline.add_lane(NullSink(None), MemoryBuffer(1_000_000), batch_size=10**9,
                             interval=3600.0)
    return fake, clock, pipeline, lane


def buffered(lane: Lane) -> list[Point]:
    """Everything in the lane's buffer, oldest first (taken and acknowledged)."""
    out: list[Point] = []
    while (batch := lane.buffer.take(10**6)) is not None:
        out.extend(batch.points)
        lane.buffer.ack(batch)
    return out


def ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@pytest.fixture
def warnings_of(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="plexus.clock")
    yield caplog


def clock_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "plexus.clock" and r.levelno >= logging.WARNING and text in r.getMessage()]


# --- a trusted clock ------------------------------------------------------------------------


def test_a_plausible_clock_stamps_points_as_they_come() -> None:
    fake, clock, pipeline, lane = make(NOW)
    pipeline.emit("a", 1.0)
    fake.advance(0.25)
    pipeline.emit("b", 2.0, tags={"k": "v"})
    assert [(m, ts) for m, _v, ts, _t in buffered(lane)] == [("a", ms(NOW)), ("b", ms(NOW + 0.25))]
    assert clock.status()["state"] == "trusted"
    assert clock.status()["held"] == 0


# --- no trustworthy time: points wait, then take the time they were taken --------------------


def test_points_wait_while_the_clock_says_1970_and_are_stamped_when_network_time_arrives(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(42.0)  # a board without an RTC, 42 s after boot
    assert clock_warnings(warnings_of, "1970-01-01T00:00:42Z, before")
    pipeline.emit("temp", 20.0)
    fake.advance(10)
    pipeline.emit("temp", 21.0, tags={"bay": "3"})
    pipeline.emit("temp", 22.0, timestamp=NOW - 5)  # explicit: never held, never changed
    pipeline.emit_many([("a", 1.0), ("b", 2.0)])
    assert buffered(lane) == [("temp", 22.0, ms(NOW - 5), None)]
    assert clock.status()["held"] == 4

    fake.advance(5)
    fake.set_wall(NOW)  # NTP steps the clock 15 s after the first reading
    clock.check()

    points = buffered(lane)
    assert [(m, v, ts) for m, v, ts, _t in points] == [
        ("temp", 20.0, ms(NOW - 15)), ("temp", 21.0, ms(NOW - 5)),
        ("a", 1.0, ms(NOW - 5)), ("b", 2.0, ms(NOW - 5))]
    assert points[1][3] == {"bay": "3"}
    status = clock.status()
    assert status["state"] == "trusted" and status["held"] == 0
    assert status["released"] == 4 and status["steps"] == 1
    assert status["last_step_s"] == pytest.approx(NOW - 57, abs=1)
    assert len(clock_warnings(warnings_of, "stepped forward")) == 1
    pipeline.emit("temp", 23.0)
    assert buffered(lane) == [("temp", 23.0, ms(NOW), None)]


def test_send_batch_readings_with_their_own_time_go_at_once_the_others_wait() -> None:
    fake, clock, pipeline, lane = make(42.0)
    assert pipeline.emit_many([("a", 1.0), ("b", 2.0, NOW - 60), ("c", 3.0)],
                              tags={"k": "v"}) == 3
    assert buffered(lane) == [("b", 2.0, ms(NOW - 60), {"k": "v"})]
    fake.advance(1)
    fake.set_wall(NOW)
    clock.check()
    assert buffered(lane) == [("a", 1.0, ms(NOW - 1), {"k": "v"}),
                              ("c", 3.0, ms(NOW - 1), {"k": "v"})]


def test_health_points_take_the_clocks_time_and_are_skipped_while_it_is_unknown() -> None:
    fake, clock, pipeline, lane = make(42.0)
    lane.uploader.side = side = MemoryBuffer(100)
    assert pipeline.emit_side([("plexus.agent.backlog", 1, None)]) == 0
    assert len(side) == 0 and clock.status()["held"] == 0  # not held: the next report says it
    fake.set_wall(NOW)
    clock.check()
    assert pipeline.emit_side([("plexus.agent.backlog", 2, None)]) == 1
    batch = side.take(10)
    assert batch is not None and [(m, v, ts) for m, v, ts, _t in batch.points] == [
        ("plexus.agent.backlog", 2, ms(NOW))]


def test_the_platforms_date_header_stamps_until_the_system_clock_is_sane() -> None:
    fake, clock, pipeline, lane = make(1_000.0)
    pipeline.emit("x", 1.0)
    fake.advance(2)
    sent = fake.mono_ns()
    fake.advance(0.1)  # the request took 100 ms; the Date header says NOW, whole seconds
    clock.observe("http-date", int(NOW) * E9, sent, fake.mono_ns(), resolution_ns=E9)
    clock.check()
    # The true time at the answer was within [NOW, NOW + 1.1 s]: the middle is used.
    (point,) = buffered(lane)
    assert abs(point[2] - ms(NOW + 0.55 - 2.1)) <= 1
    assert clock.status()["state"] == "reference" and clock.status()["basis"] == "http-date"
    fake.advance(1)
    pipeline.emit("x", 2.0)  # stamped from the monotonic clock + the platform's offset
    assert abs(buffered(lane)[0][2] - ms(NOW + 1.55)) <= 1

    fake.set_wall(NOW + 1.6)
    clock.check()
    assert clock.status()["state"] == "trusted"
    pipeline.emit("x", 3.0)
    assert buffered(lane)[0][2] == ms(NOW + 1.6)


def test_date_headers_at_different_phases_narrow_the_platforms_time_to_a_few_ms() -> None:
    """Whole-second Date headers, seen at different fractions of a second, pin the time down."""
    true_offset = int(NOW * E9) - ManualTime(0, running=False).mono_ns() + 123_456_789
    fake, clock, pipeline, lane = make(10.0)
    for i in range(20):  # one request every 0.37 s: the answers fall at every phase
        fake.advance(0.37)
        sent = fake.mono_ns()
        received = sent + 20_000_000  # 20 ms round trips
        server_ns = (sent + 10_000_000 + true_offset) // E9 * E9  # truncated, as HTTP does
        clock.observe("http-date", server_ns, sent, received, resolution_ns=E9)
        if i == 0:
            clock.check()
            assert clock.status()["uncertainty_s"] == pytest.approx(0.51, abs=0.001)
    clock.check()
    assert clock.status()["uncertainty_s"] < 0.06
    pipeline.emit("x", 1.0)
    (point,) = buffered(lane)
    truth_ms = (fake.mono_ns() + true_offset) // 1_000_000
    # One header alone is good to +-0.5 s; twenty, to about the round trip (20 ms) plus
    # the largest gap between their phases.
    assert abs(point[2] - truth_ms) <= 60


def test_a_gps_time_from_before_the_build_date_is_ignored(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(5.0)
    rollover = NOW - 1024 * 7 * DAY  # a receiver with the GPS week rollover bug
    mono = fake.mono_ns()
    assert not clock.observe("gps", int(rollover * E9), mono - E9, mono)
    pipeline.emit("x", 1.0)
    clock.check()
    assert buffered(lane) == []
    assert clock.status()["rejected_references"] == 1
    assert clock_warnings(warnings_of, "ignoring GPS time")


def test_past_the_bound_the_oldest_waiting_points_are_dropped_and_counted(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(5.0, hold_max_points=5)
    for i in range(8):
        pipeline.emit("n", float(i))
    assert clock.status()["dropped"] == 3
    assert len(clock_warnings(warnings_of, "dropping the oldest")) == 1
    fake.set_wall(NOW)
    clock.check()
    assert [v for _m, v, _ts, _t in buffered(lane)] == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_at_shutdown_waiting_points_are_released_if_the_time_came_else_dropped(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(5.0)
    pipeline.emit("x", 1.0)
    mono = fake.mono_ns()
    clock.observe("device-link", int(NOW * E9), mono, mono, resolution_ns=1_000_000)
    kept: list[Point] = []
    original_close = lane.buffer.close
    lane.buffer.close = lambda: (kept.extend(buffered(lane)), original_close())  # type: ignore[method-assign]
    pipeline.close(0.0)  # no check() ran since the observation: close() releases them
    assert [(m, v) for m, v, _ts, _t in kept] == [("x", 1.0)]
    assert abs(kept[0][2] - ms(NOW)) <= 1

    fake2, clock2, pipeline2, _lane2 = make(5.0)
    pipeline2.emit("x", 1.0)
    pipeline2.emit("x", 2.0)
    pipeline2.close(0.0)
    assert clock2.status()["dropped"] == 2
    assert clock_warnings(warnings_of, "2 points taken while no trustworthy time was known are "
                                       "dropped at shutdown")


# --- a plausible clock that is wrong (fake-hwclock), and require_sync --------------------------


def test_a_reference_that_disagrees_with_an_unsynchronized_clock_wins(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(NOW - 3 * DAY)  # restored at boot from the last shutdown
    pipeline.emit("x", 1.0)  # plausible, so trusted: the case require_sync exists for
    mono = fake.mono_ns()
    clock.observe("device-link", int(NOW * E9), mono - 1_000_000, mono, resolution_ns=1_000_000)
    clock.check()
    assert clock.status()["state"] == "reference"
    assert clock.status()["stamps_minus_system_clock_s"] == pytest.approx(3 * DAY, abs=0.01)
    assert len(clock_warnings(warnings_of, "3 d 0 h behind the platform's time (device link)")) == 1
    pipeline.emit("x", 2.0)
    first, second = (ts for _m, _v, ts, _t in buffered(lane))
    assert first == ms(NOW - 3 * DAY) and abs(second - ms(NOW)) <= 1

    fake.set_wall(NOW)  # NTP arrives: a step, and the clock agrees again
    clock.check()
    assert clock.status()["state"] == "trusted" and clock.status()["steps"] == 1


def test_a_synchronized_clock_is_kept_when_a_reference_disagrees(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(NOW)
    fake.synced = True
    mono = fake.mono_ns()
    clock.observe("gps", int((NOW + 60) * E9), mono - E9, mono)  # a GPS a minute off
    clock.check()
    clock.check()
    assert clock.status()["state"] == "trusted"
    assert len(clock_warnings(warnings_of, "the kernel says it is synchronized")) == 1
    pipeline.emit("x", 1.0)
    assert buffered(lane)[0][2] == ms(NOW)


def test_require_sync_holds_until_ntp_or_a_reference_confirms_the_clock() -> None:
    fake, clock, pipeline, lane = make(NOW, require_sync=True)
    fake.synced = False
    clock.check()
    pipeline.emit("x", 1.0)
    assert buffered(lane) == [] and clock.status()["state"] == "unknown"
    fake.advance(3)
    fake.synced = True  # chrony / timesyncd set the clock (no step: it was right)
    clock.check()
    assert buffered(lane) == [("x", 1.0, ms(NOW), None)]

    fake, clock, pipeline, lane = make(NOW, require_sync=True)
    fake.synced = False
    pipeline.emit("x", 1.0)
    mono = fake.mono_ns()
    clock.observe("http-date", int(NOW * E9), mono, mono + 50_000_000, resolution_ns=E9)
    clock.check()  # the platform agrees: the system clock is confirmed
    assert clock.status()["state"] == "trusted"
    assert buffered(lane) == [("x", 1.0, ms(NOW), None)]


# --- steps while running --------------------------------------------------------------------


def test_a_step_while_running_is_logged_once_and_counted_and_stamps_stay(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(NOW)
    pipeline.emit("x", 1.0)
    fake.advance(1)
    fake.set_wall(NOW + 1 + 2.5)  # network time corrects a clock 2.5 s slow
    clock.check()
    clock.check()
    fake.advance(1)
    clock.check()
    pipeline.emit("x", 2.0)
    assert [ts for _m, _v, ts, _t in buffered(lane)] == [ms(NOW), ms(NOW + 4.5)]
    status = clock.status()
    assert status["steps"] == 1 and status["last_step_s"] == pytest.approx(2.5)
    assert len(clock_warnings(warnings_of, "stepped forward by 2.5 s")) == 1
    assert status["state"] == "trusted"


def test_a_small_slew_is_not_a_step() -> None:
    fake, clock, _pipeline, _lane = make(NOW)
    fake.advance(1)
    fake.set_wall(NOW + 1 + 0.2)
    clock.check()
    assert clock.status()["steps"] == 0


def test_a_clock_set_back_to_1970_while_running_keeps_the_trusted_timeline(
        warnings_of: pytest.LogCaptureFixture) -> None:
    fake, clock, pipeline, lane = make(NOW)
    fake.advance(10)
    fake.set_wall(0.0)  # someone ran date -s @0, or the RTC was reread as empty
    clock.check()
    fake.advance(5)
    pipeline.emit("x", 1.0)  # no waiting: the monotonic clock and the last trusted offset
    assert buffered(lane) == [("x", 1.0, ms(NOW + 15), None)]
    assert clock.status()["state"] == "reference" and clock.status()["basis"] == "system"
    assert clock.status()["steps"] == 1
    assert clock_warnings(warnings_of, "stamping from the monotonic clock")


# --- what adapters see ---------------------------------------------------------------------


def test_now_and_from_wall_give_the_trusted_time_or_none() -> None:
    fake, clock, _pipeline, _lane = make(500.0)
    assert clock.now() is None and clock.from_wall(500.0) is None
    mono = fake.mono_ns()
    clock.observe("mavlink", int(NOW * E9), mono, mono)
    clock.check()
    assert clock.now() == pytest.approx(NOW, abs=0.001)
    # A kernel timestamp taken 2 s ago on the (wrong) system clock, mapped to the trusted time:
    assert clock.from_wall(498.0) == pytest.approx(NOW - 2, abs=0.001)


# --- explicit timestamps "in the future" are judged against the trusted time -------------------


def test_explicit_timestamps_are_not_rejected_as_future_while_the_clock_is_unknown() -> None:
    month_ahead = time.time() + 30 * DAY
    with pytest.raises(ValidationError, match="in the future"):
        timestamp_ms(month_ahead)
    # The real system clock, with a floor in the future: it is "1970" for this clock.
    clock = Clock(not_before=time.time() + 365 * DAY)
    try:
        assert system_clock_behind_s() is None
        assert timestamp_ms(month_ahead) == int(month_ahead * 1000)
        with pytest.raises(ValidationError, match="looks like milliseconds"):
            timestamp_ms(month_ahead * 1000)  # a unit mistake is still one
    finally:
        clock.stop()
    assert system_clock_behind_s() == 0
    with pytest.raises(ValidationError, match="in the future"):
        timestamp_ms(month_ahead)


# --- settings ---------------------------------------------------------------------------------


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="hold_max_points"):
        Clock(hold_max_points=0)
    with pytest.raises(ValueError, match="positive"):
        Clock(step_threshold=0)


def test_the_rigs_clock_section_sets_the_gateways_clock(tmp_path) -> None:
    from plexus.config import ConfigErrors, load_config_text
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins

    registry = load_plugins()
    text = ("source_id: rig-01\napi_key: plx_test\n"
            "clock:\n  not_before: 2020-02-03\n  require_sync: true\n  tolerance: 5\n"
            "  hold_max_points: 50\n  platform_time: false\n"
            "adapters:\n  - type: callable\n    function: tests.gateway_funcs:pairs\n")
    config = load_config_text(text, str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    gateway = Gateway(config, registry, dry_run=True)
    clock = gateway.pipeline.clock
    assert clock.not_before_ns == 1_580_688_000 * E9  # 2020-02-03T00:00:00Z
    assert clock.require_sync and clock.hold_max_points == 50 and not clock.platform_time
    assert gateway.status()["clock"]["state"] in ("trusted", "unknown")

    bad = text.replace("2020-02-03", "03/02/2020")
    with pytest.raises(ConfigErrors) as info:
        load_config_text(bad, "rig.yaml", adapter_types=registry.adapters,
                         sink_types=registry.sinks)
    assert str(info.value).splitlines() == [
        "rig.yaml:4: clock.not_before: must be a day as YYYY-MM-DD, got '03/02/2020'"]


# --- the build date ---------------------------------------------------------------------------


def test_the_build_date_is_a_day_not_after_today_and_version_shows_it() -> None:
    from datetime import date, datetime, timezone

    from plexus.buildinfo import BUILD_DATE
    from plexus.cli import version_text

    # A build date after the real one would make every correct clock untrusted.
    assert date.fromisoformat(BUILD_DATE) <= datetime.now(timezone.utc).date()
    assert BUILD_DATE_S == datetime.fromisoformat(BUILD_DATE).replace(
        tzinfo=timezone.utc).timestamp()
    assert f"(built {BUILD_DATE}:" in version_text()


def test_the_release_tool_writes_the_build_date(tmp_path, monkeypatch) -> None:
    import importlib.util
    from datetime import date
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "stamp_build_date.py"
    spec = importlib.util.spec_from_file_location("stamp_build_date", tool)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = tmp_path / "buildinfo.py"
    copy.write_text((Path(__file__).parents[1] / "plexus" / "buildinfo.py").read_text())
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1800000000")  # 2027-01-15T08:00:00Z
    module.stamp(module.build_day([]), copy)
    assert 'BUILD_DATE = "2027-01-15"' in copy.read_text()
    module.stamp(date(2028, 2, 29), copy)
    namespace: dict[str, object] = {}
    exec(copy.read_text(), namespace)
    assert namespace["BUILD_DATE"] == "2028-02-29"
