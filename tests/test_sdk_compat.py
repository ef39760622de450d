"""The official SDK's names (plexus-python 0.16) on this package, against the local receiver.

Each test is what an SDK user's code does, and asserts what arrives (or what
is refused) the way that user would see it. docs/migrating.md is the table.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

import plexus.sdk_compat
from plexus import (
    BatchSender,
    ClientClosedError,
    CommandParamError,
    CommandRun,
    ConfigError,
    DeliveryError,
    Plexus,
    PlexusError,
    PointTypeError,
    RateLimitedError,
    RetryConfig,
    RetryPolicy,
    UnsupportedError,
    ValidationError,
)

KEY = "plx_test"
FAST = RetryConfig(max_retries=2, base_delay=0.01, max_delay=0.05, jitter=False)


def make_client(receiver, *args, **kwargs):
    kwargs.setdefault("gateway_url", receiver.url)
    kwargs.setdefault("flush_interval", 0.05)
    if "retry" not in kwargs:
        kwargs.setdefault("retry_config", FAST)
    return Plexus(KEY, *args, **kwargs)


# --- the constructor: both positional orders, never the wrong source id ----------------


@pytest.mark.parametrize(("args", "kwargs", "expected"), [
    (("rig-01",), {}, "rig-01"),                                     # this package's order
    (("https://app.plexus.company", "rig-02"), {}, "rig-02"),        # the SDK's order
    (("http://127.0.0.1:9", "rig-03", 5.0), {}, "rig-03"),          # ... with its timeout
    ((None, "rig-04"), {}, "rig-04"),                                # SDK: endpoint=None
    (("https://app.plexus.company",), {"source_id": "rig-05"}, "rig-05"),
    ((), {"endpoint": "https://app.plexus.company", "source_id": "rig-06"}, "rig-06"),
])
def test_both_orders_send_under_the_source_id_written(plexus_receiver, args, kwargs, expected):
    with make_client(plexus_receiver, *args, **kwargs) as px:
        assert px.source_id == expected
        px.send("temperature", 21.5)
        px.flush_buffer(timeout=10)
    assert {p["source_id"] for p in plexus_receiver.points} == {expected}


def test_our_positional_gateway_url_still_works(plexus_receiver):
    with Plexus(KEY, "rig-01", plexus_receiver.url, flush_interval=0.05) as px:
        px.send("x", 1.0)
        px.flush_buffer(timeout=10)
    assert plexus_receiver.points[0]["source_id"] == "rig-01"


def test_an_sdk_source_id_never_becomes_our_gateway_url(plexus_receiver, monkeypatch):
    # SDK code: Plexus(key, endpoint, source_id). Read in our order, "rig-07" would be
    # the gateway URL; read in the SDK's, it is the source id, as written.
    monkeypatch.setenv("PLEXUS_GATEWAY_URL", plexus_receiver.url)
    with Plexus(KEY, None, "rig-07", flush_interval=0.05) as px:
        px.send("x", 1.0)
        px.flush_buffer(timeout=10)
    assert plexus_receiver.points[0]["source_id"] == "rig-07"


@pytest.mark.parametrize("args", [
    ("localhost:8080",),        # an endpoint without a scheme is no source id either
    ("Rig 01",),
])
def test_an_unreadable_second_argument_fails_loudly(plexus_receiver, args):
    with pytest.raises(ConfigError, match="source_id"):
        make_client(plexus_receiver, *args)
    assert plexus_receiver.count == 0


def test_an_argument_given_twice_or_too_many_is_a_type_error(plexus_receiver):
    with pytest.raises(TypeError, match="multiple values for argument 'source_id'"):
        make_client(plexus_receiver, "https://app.plexus.company", "rig-01", source_id="rig-02")
    with pytest.raises(TypeError, match="at most 3 positional arguments"):
        Plexus(KEY, "rig-01", plexus_receiver.url, 5.0)
    with pytest.raises(TypeError, match="at most 9 positional arguments"):
        Plexus(KEY, "https://x.example", "rig-01", 5.0, None, None, False, None, None, "extra")


def test_endpoint_is_kept_and_noted_once(plexus_receiver, caplog, monkeypatch):
    monkeypatch.setattr(plexus.sdk_compat, "_endpoint_noted", threading.Event())
    caplog.set_level(logging.INFO, logger="plexus.client")
    with make_client(plexus_receiver, "https://app.plexus.company", "rig-01") as a, \
            make_client(plexus_receiver, endpoint="https://app.plexus.company") as b:
        assert a.endpoint == b.endpoint == "https://app.plexus.company"
        a.send("x", 1.0)
        a.flush_buffer(timeout=10)
    notes = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(notes) == 1 and "test runs" in notes[0]
    assert plexus_receiver.count == 1  # and the data went to the gateway URL


def test_max_buffer_size_is_the_buffer_cap(plexus_receiver):
    plexus_receiver.go_down()
    with make_client(plexus_receiver, source_id="rig-01", max_buffer_size=5,
                     when_full="drop_oldest", close_timeout=0.1) as px:
        for i in range(12):
            px.send("seq", i)
        assert px.buffer_size() <= 5
        assert px.dropped >= 7
    with pytest.raises(ConfigError, match="name the same cap"):
        make_client(plexus_receiver, max_buffer_size=5, max_buffer_points=6)


# --- RetryConfig ----------------------------------------------------------------------


def test_retry_config_defaults_and_delays_are_the_sdks():
    config = RetryConfig()
    assert (config.max_retries, config.base_delay, config.max_delay,
            config.exponential_base, config.jitter) == (3, 1.0, 30.0, 2.0, True)
    steady = RetryConfig(base_delay=1.0, max_delay=5.0, jitter=False)
    assert [steady.get_delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = [RetryConfig(base_delay=2.0).get_delay(1) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in jittered) and len(set(jittered)) > 1


def test_retry_config_becomes_our_policy():
    policy = RetryConfig(max_retries=5, base_delay=0.5, max_delay=8.0, exponential_base=3.0,
                         jitter=False).to_policy()
    assert isinstance(policy, RetryPolicy)
    assert (policy.retries, policy.base, policy.max_delay, policy.jitter) == (5, 0.5, 8.0, 0.0)
    assert [policy.delay(n) for n in range(4)] == [0.5, 1.5, 4.5, 8.0]
    assert RetryConfig().to_policy().jitter == 0.25
    with pytest.raises(ConfigError, match="exponential_base"):
        RetryConfig(exponential_base=0.5).to_policy()


def test_retry_config_drives_the_uploader(plexus_receiver):
    pauses: list[float] = []
    config = RetryConfig(max_retries=2, base_delay=0.01, exponential_base=3.0, jitter=False)
    with make_client(plexus_receiver, source_id="rig-01", retry_config=config,
                     sleep=pauses.append) as px:
        plexus_receiver.fail_next(2, 503)
        px.send("x", 1.0)
        assert px.flush_buffer(timeout=10)
        assert pauses[:2] == pytest.approx([0.01, 0.03])
        plexus_receiver.fail_next(3, 503)  # one attempt and two retries: the cycle gives up
        px.send("y", 2.0)
        with pytest.raises(DeliveryError):
            px.flush_buffer(timeout=10)
        assert px.buffer_size() == 1
        assert px.flush_buffer(timeout=10)
    assert sorted(p["metric"] for p in plexus_receiver.points) == ["x", "y"]
    with pytest.raises(ConfigError, match="not both"):
        make_client(plexus_receiver, retry=RetryPolicy(), retry_config=RetryConfig())
    with pytest.raises(ConfigError, match="RetryConfig"):
        make_client(plexus_receiver, retry_config={"max_retries": 1})


# --- send_batch with per-point timestamps -------------------------------------------------


def test_send_batch_takes_three_tuples(plexus_receiver):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        px.send_batch([("imu.accel_x", 0.12, 1_700_000_001.5), ("pressure", 1013.2, 1_700_000_002),
                       ("temperature", 22.4), ("humidity", 40.0, None)],
                      timestamp=1_700_000_000, tags={"bench": "3"})
        px.flush_buffer(timeout=10)
    stamps = {p["metric"]: p["timestamp"] for p in plexus_receiver.points}
    assert stamps == {"imu.accel_x": 1_700_000_001_500, "pressure": 1_700_000_002_000,
                      "temperature": 1_700_000_000_000, "humidity": 1_700_000_000_000}
    assert all(p["tags"] == {"bench": "3"} for p in plexus_receiver.points)


@pytest.mark.parametrize(("bad", "error", "match"), [
    (("t", 1.0, "yesterday"), PointTypeError, r"points\[1\]: timestamp must be Unix seconds"),
    (("t", 1.0, 1_700_000_000_000), ValidationError, r"points\[1\]: .*milliseconds"),
    (("t", 1.0, float("nan")), ValidationError, r"points\[1\]: timestamp must be finite"),
    (("t", 1.0, 1.0, "extra"), PointTypeError, r"points\[1\] must be a \(metric, value\)"),
    (("t",), PointTypeError, r"points\[1\] must be a \(metric, value\)"),
])
def test_a_bad_three_tuple_buffers_nothing(plexus_receiver, bad, error, match):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        with pytest.raises(error, match=match):
            px.send_batch([("ok", 1.0, 1_700_000_000), bad, ("ok", 2.0)])
        assert px.buffer_size() == 0
        px.send("after", 3.0)
        px.flush_buffer(timeout=10)
    assert [p["metric"] for p in plexus_receiver.points] == ["after"]


# --- event() ----------------------------------------------------------------------------


def test_events_arrive_as_text_objects_and_flags(plexus_receiver):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        assert px.event("fault", "E-stop triggered") is True
        px.event("state_change", {"from": "IDLE", "to": "RUNNING"}, timestamp=1_700_000_000)
        px.event("sensor_error", {"sensor": "imu", "code": 42}, tags={"motor": "A"})
        px.event("readings", [1, 2, 3])
        px.event("door_open", True)
        px.flush_buffer(timeout=10)
    got = {p["metric"]: p for p in plexus_receiver.points}
    assert got["fault"]["value"] == "E-stop triggered"
    assert got["state_change"]["value"] == {"from": "IDLE", "to": "RUNNING"}
    assert got["state_change"]["timestamp"] == 1_700_000_000_000
    assert got["sensor_error"]["tags"] == {"motor": "A"}
    assert got["readings"]["value"] == [1, 2, 3] and got["door_open"]["value"] is True


@pytest.mark.parametrize(("data", "error", "match"), [
    (42, PointTypeError, "a number is a reading"),
    (3.5, PointTypeError, "a number is a reading"),
    (None, ValidationError, "None"),
    ("é" * 129, ValidationError, "at most 256 bytes"),
    ({"log": "x" * 5000}, ValidationError, "at most 4096 bytes of JSON"),
    (b"raw", PointTypeError, "unsupported type bytes"),
])
def test_an_event_the_platform_would_refuse_is_refused_at_the_call(plexus_receiver, data,
                                                                  error, match):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        with pytest.raises(error, match=match):
            px.event("fault", data)
        with pytest.raises(ValidationError, match="metric"):
            px.event("", "empty name")
        assert px.buffer_size() == 0


# --- batch() ----------------------------------------------------------------------------


def test_batch_sends_through_the_client_with_each_readings_own_time(plexus_receiver):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        with px.batch(interval_ms=50) as b:
            assert isinstance(b, BatchSender)
            for i in range(300):
                b.send("att.pos_x", float(i))
                b.send("frames.captured", i, tags={"cam": "front"})
                if i == 150:
                    time.sleep(0.05)
            b.send_batch([("a", 1.0), ("b", 2.0, 1_700_000_000)])
            assert b.pending == 0
        assert plexus_receiver.wait_for(602, timeout=10)
    points = plexus_receiver.points
    xs = [p for p in points if p["metric"] == "att.pos_x"]
    assert [p["value"] for p in xs] == [float(i) for i in range(300)]
    assert xs[151]["timestamp"] - xs[150]["timestamp"] >= 40  # not restamped at flush
    assert {p["metric"]: p["timestamp"] for p in points}["b"] == 1_700_000_000_000
    assert len(plexus_receiver.requests) < 100  # batched into requests, not one per reading


def test_batch_checks_its_arguments_like_the_sdk(plexus_receiver):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        for kwargs in ({"interval_ms": 0.5}, {"max_points": 0},
                       {"max_points": 10, "max_pending": 5}):
            with pytest.raises(ValueError):  # a ConfigError, as the SDK raises ValueError
                px.batch(**kwargs)
        with pytest.raises(ValidationError):
            with px.batch() as b:
                b.send("temp", float("inf"))  # raises at the call, not later


def test_a_closed_batch_refuses_points_and_flush_waits_for_delivery(plexus_receiver):
    with make_client(plexus_receiver, source_id="rig-01", flush_interval=10) as px:
        b = px.batch()
        b.send("x", 1.0)
        b.flush()  # the client's flush_buffer(): delivered on return
        assert plexus_receiver.count == 1
        b.close()
        b.close()
        with pytest.raises(ClientClosedError):
            b.send("x", 2.0)
        with pytest.raises(ClientClosedError):
            b.send_batch([("x", 2.0)])
        px.send("y", 3.0)  # the client is still open
        px.flush_buffer(timeout=10)
    assert [p["metric"] for p in plexus_receiver.points] == ["x", "y"]


def test_batch_dropped_counts_what_the_buffer_dropped_while_open(plexus_receiver):
    plexus_receiver.go_down()
    with make_client(plexus_receiver, source_id="rig-01", max_buffer_size=10,
                     when_full="drop_oldest", close_timeout=0.1) as px:
        px.send("before", 0.0)
        with px.batch(max_points=10, max_pending=10) as b:
            assert b.dropped == 0
            for i in range(30):
                b.send("seq", i)
            while_open = b.dropped
            assert while_open == px.dropped >= 20
        for i in range(10):
            px.send("after", i)
        assert px.dropped > while_open and b.dropped == while_open  # frozen at close
        assert "dropped=" in repr(b)


# --- loss reporting: rate ceiling, rejections -------------------------------------------------


def test_the_rate_ceiling_loses_nothing_and_raises_nothing(plexus_receiver_factory):
    # One request per 0.5 s per source: every quicker request is answered with
    # count 0 and not stored, as the platform does at its 0.5 ms ceiling.
    rx = plexus_receiver_factory(api_keys=(KEY,), rate_limit_interval=0.5)
    with Plexus(KEY, "rig-01", rx.url, flush_interval=0.001, batch_size=1,
                retry_config=FAST) as px:
        for i in range(30):
            px.send("seq", i)  # never raises RateLimitedError
            time.sleep(0.005)
        px.flush_buffer(timeout=30)
        assert rx.rate_limited > 0
        assert px.rate_limited_frames == 0 and px.dropped_points == 0 and px.dropped == 0
    assert sorted(p["value"] for p in rx.points) == list(range(30))
    assert issubclass(RateLimitedError, PlexusError)


def test_dropped_points_counts_what_the_platform_refused(plexus_receiver_factory):
    rx = plexus_receiver_factory(
        api_keys=(KEY,),
        extra_check=lambda p: "no secrets here" if p["metric"] == "secret" else None)
    with Plexus(KEY, "rig-01", rx.url, flush_interval=0.05, retry_config=FAST) as px:
        px.send_batch([("a", 1.0), ("secret", 2.0), ("b", 3.0)])
        px.flush_buffer(timeout=10)
        assert px.dropped_points == 1 == px.stats.rejected
    assert sorted(p["metric"] for p in rx.points) == ["a", "b"]


# --- what needs the hosted platform -----------------------------------------------------------


@pytest.mark.parametrize(("call", "hint"), [
    (lambda px: px.run("hotfire-03", pass_criteria=[]), "px.session('hotfire-03')"),
    (lambda px: px.start_run("hotfire-03"), "px.session"),
    (lambda px: px.end_run("run-1"), "px.session"),
    (lambda px: px.send_video_frame(b"\xff\xd8\xff\xd9", camera_id="front"), "video"),
    (lambda px: px.send_thermal_frame(None), "thermal"),
    (lambda px: px.stream_camera("rtsp://127.0.0.1/x", camera_id="front"), "video"),
])
def test_hosted_only_features_fail_loudly(plexus_receiver, call, hint):
    with make_client(plexus_receiver, source_id="rig-01") as px:
        px.send("before", 1.0)
        with pytest.raises(UnsupportedError, match="docs/migrating.md") as info:
            call(px)
        assert hint in str(info.value)
        px.send("after", 2.0)  # the client goes on
        px.flush_buffer(timeout=10)
    assert [p["metric"] for p in plexus_receiver.points] == ["before", "after"]


# --- the SDK's other names --------------------------------------------------------------------


def test_the_sdks_import_paths_work():
    from plexus.batching import BatchSender as FromModule
    from plexus.client import AuthenticationError, PlexusError, RateLimitedError  # noqa: F401

    assert FromModule is BatchSender
    assert CommandRun.__name__ == "Run" and issubclass(CommandParamError, ValueError)


def test_on_command_takes_the_sdks_keywords_and_stop_serving_ends_serve(plexus_receiver,
                                                                         plexus_run_command):
    px = make_client(plexus_receiver, source_id="pod-07", ws_url=plexus_receiver.ws_url)
    px.on_command("reboot", lambda name, params: {"rebooted": name}, description="reboot",
                  params=[{"name": "delay", "type": "int"}])
    served = threading.Thread(target=px.serve)
    served.start()
    try:
        result = plexus_run_command("reboot", {"delay": 1}, legacy=True)
        assert result.result == {"rebooted": "reboot"}
    finally:
        px.stop_serving()
        served.join(10)
    assert not served.is_alive()
    with pytest.raises(ClientClosedError):  # serve() closed the client on the way out
        px.send("x", 1.0)
