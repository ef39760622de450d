"""The embedded client, as a user sees it, against the local receiver over real HTTP."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from plexus import (
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    DeliveryError,
    Plexus,
    PlexusError,
    RetryPolicy,
    ValidationError,
)

KEY = "plx_test"
FAST_RETRY = RetryPolicy(retries=3, base=0.01, max_delay=0.05)


def make_client(receiver, **kwargs):
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("source_id", "rig-01")
    kwargs.setdefault("gateway_url", receiver.url)
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("flush_interval", 0.05)
    return Plexus(**kwargs)


def write_user_config(home: Path, **values) -> Path:
    path = home / ".plexus" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return path


# --- the public API as written in the issue ---------------------------------------------


def test_the_documented_example_delivers_every_kind_of_value(plexus_receiver):
    with make_client(plexus_receiver) as px:
        assert px.send("temperature", 72.5) is True
        assert px.send("temperature", 72.5, timestamp=1700000000, tags={"location": "lab"})
        px.send("status", "running")
        px.send("motor.enabled", True)
        px.send("position", {"x": 1.2, "y": 3.4, "z": 0.0})
        px.send("joint_angles", [0.5, 1.2, -0.3])
        assert px.send_batch([("temperature", 72.5), ("humidity", 45.2)], tags={"motor_id": "A"})
        with px.session("thermal-cycle-002", tags={"operator": "jchen", "rig": "A"}):
            px.send("temperature", 71.0)
        assert px.flush_buffer() is True
        assert px.buffer_size() == 0
    points = plexus_receiver.points
    assert len(points) == 9
    assert {p["source_id"] for p in points} == {"rig-01"}
    stamped = [p for p in points if p.get("tags") == {"location": "lab"}]
    assert stamped[0]["timestamp"] == 1700000000000
    values = {(p["metric"], json.dumps(p["value"])) for p in points}
    assert ("motor.enabled", "true") in values
    assert ("position", json.dumps({"x": 1.2, "y": 3.4, "z": 0.0})) in values
    assert ("joint_angles", "[0.5, 1.2, -0.3]") in values
    batch = [p for p in points if p.get("tags") == {"motor_id": "A"}]
    assert sorted(p["metric"] for p in batch) == ["humidity", "temperature"]
    in_session = [p for p in points if p["value"] == 71.0]
    assert in_session[0]["tags"] == {
        "session_id": "thermal-cycle-002", "operator": "jchen", "rig": "A",
    }


def test_persistent_buffer_context_manager(plexus_receiver, tmp_path):
    with make_client(plexus_receiver, persistent_buffer=True,
                     buffer_path=tmp_path / "b.db") as px2:
        px2.send("temperature", 72.5)
    assert plexus_receiver.wait_for(1)
    assert plexus_receiver.points[0]["value"] == 72.5


def test_persistent_buffer_default_path_is_per_source(plexus_receiver, isolated_home):
    with make_client(plexus_receiver, persistent_buffer=True, source_id="rig-07") as px:
        px.send("t", 1)
    assert (isolated_home / ".plexus" / "buffer" / "rig-07.db").exists()


def test_send_batch_goes_out_in_one_request(plexus_receiver):
    with make_client(plexus_receiver, flush_interval=60) as px:
        px.send_batch([(f"m{i}", i) for i in range(500)], timestamp=1700000000)
        px.flush_buffer()
    ingest = [r for r in plexus_receiver.requests if r.points]
    assert len(ingest) == 1 and ingest[0].points == 500


def test_send_batch_with_a_bad_entry_buffers_nothing(plexus_receiver):
    with make_client(plexus_receiver) as px:
        with pytest.raises(ValidationError, match=r"points\[1\].*finite"):
            px.send_batch([("a", 1.0), ("b", float("nan")), ("c", 3.0)])
        assert px.buffer_size() == 0
        px.send("good", 1.0)
        px.flush_buffer()
    assert [p["metric"] for p in plexus_receiver.points] == ["good"]


def test_bad_point_raises_and_good_points_still_go(plexus_receiver):
    with make_client(plexus_receiver) as px:
        px.send("a", 1.0)
        with pytest.raises(ValueError) as info:
            px.send("b", float("inf"))
        assert isinstance(info.value, PlexusError)
        with pytest.raises(TypeError):
            px.send("c", b"bytes")
        px.send("d", 2.0)
        px.flush_buffer()
    assert [p["metric"] for p in plexus_receiver.points] == ["a", "d"]


# --- settings: key, source id, gateway URL --------------------------------------------


def test_api_key_priority_constructor_env_file(plexus_receiver_factory, isolated_home, monkeypatch):
    write_user_config(isolated_home, api_key="plx_file", source_id="rig-01")
    only_file = plexus_receiver_factory(api_keys=["plx_file"])
    with Plexus(gateway_url=only_file.url, retry=FAST_RETRY) as px:
        px.send("t", 1)
        px.flush_buffer()
    assert only_file.count == 1

    monkeypatch.setenv("PLEXUS_API_KEY", "plx_env")
    only_env = plexus_receiver_factory(api_keys=["plx_env"])
    with Plexus(gateway_url=only_env.url, retry=FAST_RETRY) as px:
        px.send("t", 1)
        px.flush_buffer()
    assert only_env.count == 1

    only_ctor = plexus_receiver_factory(api_keys=["plx_ctor"])
    with Plexus(api_key="plx_ctor", gateway_url=only_ctor.url, retry=FAST_RETRY) as px:
        px.send("t", 1)
        px.flush_buffer()
    assert only_ctor.count == 1


def test_missing_key_raises_authentication_error_and_keeps_data(plexus_receiver):
    px = Plexus(source_id="rig-01", gateway_url=plexus_receiver.url, retry=FAST_RETRY)
    try:
        with pytest.raises(AuthenticationError, match="no API key"):
            px.send("t", 1.0)
        with pytest.raises(AuthenticationError):
            px.send_batch([("t", 2.0)])
        with pytest.raises(AuthenticationError):
            px.flush_buffer()
        assert px.buffer_size() == 2
        assert plexus_receiver.count == 0
    finally:
        px.close(timeout=0.2)


def test_rejected_key_raises_from_flush_then_send_and_keeps_data(plexus_receiver):
    px = make_client(plexus_receiver, api_key="plx_wrong", flush_interval=60,
                     retry=RetryPolicy(base=0.01))  # a refused key waits max_delay (30 s)
    try:
        px.send("t", 1.0)
        with pytest.raises(AuthenticationError, match="401"):
            px.flush_buffer()
        with pytest.raises(AuthenticationError):
            px.send("t", 2.0)
        assert px.buffer_size() == 2
        # No retry storm: one attempt per flush, none in between.
        time.sleep(0.3)
        assert len(plexus_receiver.requests) == 1
    finally:
        px.close(timeout=0.2)


def test_forbidden_key_is_an_authentication_error(plexus_receiver_factory):
    receiver = plexus_receiver_factory(api_keys=["plx_test"], forbidden_keys=["plx_ro"])
    px = make_client(receiver, api_key="plx_ro", flush_interval=60)
    try:
        px.send("t", 1.0)
        with pytest.raises(AuthenticationError, match="403"):
            px.flush_buffer()
        assert px.buffer_size() == 1
    finally:
        px.close(timeout=0.2)


def test_source_id_priority_and_generation(plexus_receiver, isolated_home, monkeypatch):
    config = write_user_config(isolated_home, source_id="from-file")
    with make_client(plexus_receiver, source_id=None) as px:
        assert px.source_id == "from-file"
    monkeypatch.setenv("PLEXUS_SOURCE_ID", "from-env")
    with make_client(plexus_receiver, source_id=None) as px:
        assert px.source_id == "from-env"
    with make_client(plexus_receiver, source_id="from-ctor") as px:
        assert px.source_id == "from-ctor"
    monkeypatch.delenv("PLEXUS_SOURCE_ID")
    config.unlink()
    with make_client(plexus_receiver, source_id=None) as px:
        generated = px.source_id
    assert generated.startswith("source-") and len(generated) == len("source-") + 8
    saved = json.loads(config.read_text())
    assert saved["source_id"] == generated
    assert config.stat().st_mode & 0o777 == 0o600
    with make_client(plexus_receiver, source_id=None) as px:
        assert px.source_id == generated  # stable across runs


def test_invalid_source_id_fails_at_construction(plexus_receiver):
    with pytest.raises(ConfigError, match="source_id"):
        make_client(plexus_receiver, source_id="Bad Id")


def test_gateway_url_priority(plexus_receiver_factory, isolated_home, monkeypatch):
    file_rx, env_rx, ctor_rx = (plexus_receiver_factory() for _ in range(3))
    write_user_config(isolated_home, gateway_url=file_rx.url)
    for expected, setup in ((file_rx, None), (env_rx, "env"), (ctor_rx, "ctor")):
        if setup == "env":
            monkeypatch.setenv("PLEXUS_GATEWAY_URL", env_rx.url)
        kwargs = {"gateway_url": ctor_rx.url} if setup == "ctor" else {}
        with Plexus(api_key=KEY, source_id="rig-01", retry=FAST_RETRY, **kwargs) as px:
            px.send("t", 1.0)
            px.flush_buffer()
        assert expected.count == 1


def test_default_gateway_url_is_the_hosted_platform():
    px = Plexus(api_key=KEY, source_id="rig-01")
    try:
        assert px.gateway_url == "https://gateway.plexus.company"
    finally:
        px.close(timeout=0)


# --- sessions ---------------------------------------------------------------------------


def test_session_applies_to_all_threads_and_nests(plexus_receiver):
    with make_client(plexus_receiver, tags={"rig": "global"}) as px:
        with px.session("outer", tags={"operator": "a", "shift": "1"}):
            worker = threading.Thread(target=px.send, args=("from-thread", 1.0))
            worker.start()
            worker.join()
            with px.session("inner", tags={"operator": "b"}):
                px.send("in-inner", 2.0)
            px.send("back-in-outer", 3.0)
        px.send("no-session", 4.0)
        px.flush_buffer()
    tags = {p["metric"]: p.get("tags") for p in plexus_receiver.points}
    assert tags["from-thread"] == {"rig": "global", "session_id": "outer", "operator": "a",
                                   "shift": "1"}
    assert tags["in-inner"] == {"rig": "global", "session_id": "inner", "operator": "b",
                                "shift": "1"}
    assert tags["back-in-outer"] == tags["from-thread"]
    assert tags["no-session"] == {"rig": "global"}


def test_point_tags_win_over_session_tags(plexus_receiver):
    with make_client(plexus_receiver) as px:
        with px.session("s", tags={"k": "session"}):
            px.send("m", 1.0, tags={"k": "point"})
        px.flush_buffer()
    assert plexus_receiver.points[0]["tags"] == {"session_id": "s", "k": "point"}


# --- buffering ---------------------------------------------------------------------------


def test_memory_buffer_drops_oldest_beyond_10000(plexus_receiver):
    plexus_receiver.go_down()
    px = make_client(plexus_receiver, batch_size=100_000, flush_interval=60)
    try:
        for i in range(10_050):
            px.send("seq", i)
        assert px.buffer_size() == 10_000
        assert px.dropped == 50
        plexus_receiver.come_up()
        px.flush_buffer()
    finally:
        px.close()
    assert sorted(p["value"] for p in plexus_receiver.points) == list(range(50, 10_050))


def test_close_is_idempotent_and_send_after_close_raises(plexus_receiver):
    px = make_client(plexus_receiver)
    px.send("t", 1.0)
    px.close()
    px.close()
    assert plexus_receiver.count == 1
    with pytest.raises(ClientClosedError):
        px.send("t", 2.0)
    with pytest.raises(PlexusError):
        px.send_batch([("t", 2.0)])


def test_close_is_bounded_when_the_platform_is_down(plexus_receiver, tmp_path):
    plexus_receiver.go_down()
    path = tmp_path / "b.db"
    px = make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                     retry=RetryPolicy(retries=3, base=0.2))
    for i in range(10):
        px.send("t", i)
    px.close(timeout=0.5)
    # What was not delivered stays on disk for the next run.
    plexus_receiver.come_up()
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px2:
        assert px2.buffer_size() == 10
        px2.flush_buffer()
    assert sorted(p["value"] for p in plexus_receiver.points) == list(range(10))


def test_concurrent_senders_lose_nothing(plexus_receiver):
    threads, per_thread = 8, 3000
    with make_client(plexus_receiver, max_buffer_points=100_000) as px:
        def work(n: int) -> None:
            for i in range(per_thread):
                px.send("seq", n * per_thread + i)

        pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        px.flush_buffer()
    values = sorted(p["value"] for p in plexus_receiver.points)
    assert values == list(range(threads * per_thread))


# --- retry and status codes ------------------------------------------------------------


def test_retry_delays_are_1_2_4_seconds_with_jitter(plexus_receiver):
    delays: list[float] = []
    plexus_receiver.fail_next(3, status=503)
    with make_client(plexus_receiver, retry=RetryPolicy(), sleep=delays.append) as px:
        px.send("t", 1.0)
        px.flush_buffer()
    assert len(delays) == 3
    for delay, nominal in zip(delays, (1.0, 2.0, 4.0), strict=True):
        assert nominal * 0.75 <= delay <= nominal * 1.25
    assert plexus_receiver.count == 1
    assert [r.status for r in plexus_receiver.requests] == [503, 503, 503, 200]


def test_no_delay_above_the_cap():
    policy = RetryPolicy(retries=10, base=1.0, max_delay=30.0)
    assert max(policy.delay(n) for n in range(10) for _ in range(20)) <= 30.0


def test_retries_exhausted_raise_from_flush_and_keep_data(plexus_receiver):
    plexus_receiver.fail_next(4, status=500)
    px = make_client(plexus_receiver, flush_interval=60)
    try:
        px.send("t", 1.0)
        with pytest.raises(DeliveryError, match="500"):
            px.flush_buffer()
        assert px.buffer_size() == 1
        assert len(plexus_receiver.requests) == 4  # 1 attempt + 3 retries
        assert px.flush_buffer() is True  # the next try succeeds
    finally:
        px.close()
    assert plexus_receiver.count == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(plexus_receiver, status):
    plexus_receiver.fail_next(2, status=status)
    with make_client(plexus_receiver) as px:
        px.send("t", 1.0)
        px.flush_buffer()
    assert plexus_receiver.count == 1


def test_connection_refused_is_retried(plexus_receiver):
    plexus_receiver.go_down()
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            plexus_receiver.come_up()

    with make_client(plexus_receiver, sleep=sleep) as px:
        px.send("t", 1.0)
        px.flush_buffer()
    assert plexus_receiver.count == 1 and len(calls) == 2


def test_timeout_is_retried(plexus_receiver):
    """The first request times out on our side but is stored late (a slow gateway);
    the retry repeats its Idempotency-Key, so the point is stored exactly once."""
    plexus_receiver.delay_next(1, 1.0)
    with make_client(plexus_receiver, timeout=0.2) as px:
        px.send("t", 1.0)
        px.flush_buffer()
        assert px.stats.retries == 1 and px.stats.failures == 1 and px.stats.delivered == 1
    assert plexus_receiver.wait_for_requests(2)
    requests = plexus_receiver.requests
    assert len(requests) == 2 and [r.fault for r in requests].count("delay") == 1
    assert requests[0].idempotency_key == requests[1].idempotency_key
    assert plexus_receiver.count == 1 and plexus_receiver.duplicates == 1
    assert [p["value"] for p in plexus_receiver.points] == [1.0]


def test_400_drops_only_the_bad_point(plexus_receiver_factory):
    receiver = plexus_receiver_factory(
        extra_check=lambda p: "value 13 is unlucky" if p.get("value") == 13 else None
    )
    with make_client(receiver, flush_interval=60) as px:
        for i in range(100):
            px.send("seq", i)
        px.flush_buffer()
        assert px.stats.rejected == 1
        assert "unlucky" in px.stats.last_rejection
    values = sorted(p["value"] for p in receiver.points)
    assert values == [i for i in range(100) if i != 13]


def test_400_without_an_index_is_bisected(plexus_receiver_factory):
    receiver = plexus_receiver_factory(
        extra_check=lambda p: "bad" if p.get("value") == 7 else None
    )
    receiver.fail_next(1, status=400, error="something is wrong somewhere")
    with make_client(receiver, flush_interval=60) as px:
        for i in range(16):
            px.send("seq", i)
        px.flush_buffer()
    assert sorted(p["value"] for p in receiver.points) == [i for i in range(16) if i != 7]


def test_413_splits_the_batch(plexus_receiver):
    plexus_receiver.fail_next(1, status=413)
    with make_client(plexus_receiver, flush_interval=60) as px:
        for i in range(10):
            px.send("seq", i)
        px.flush_buffer()
    assert sorted(p["value"] for p in plexus_receiver.points) == list(range(10))
    statuses = [r.status for r in plexus_receiver.requests]
    assert statuses == [413, 200, 200]
    assert sorted(r.points for r in plexus_receiver.requests[1:]) == [5, 5]


def test_rate_ceiling_count_zero_is_resent_not_counted(plexus_receiver_factory):
    receiver = plexus_receiver_factory(rate_limit_interval=0.2)
    with make_client(receiver, batch_size=1, flush_interval=0.01) as px:
        for i in range(5):
            px.send("seq", i)
            px.flush_buffer()
        assert px.stats.delivered == 5
    assert sorted(p["value"] for p in receiver.points) == list(range(5))


def test_bodies_over_1kb_are_gzipped(plexus_receiver):
    with make_client(plexus_receiver, flush_interval=60) as px:
        px.send("small", 1.0)
        px.flush_buffer()
        for i in range(200):
            px.send("big", i)
        px.flush_buffer()
    assert [r.gzip for r in plexus_receiver.requests] == [False, True]


# --- idempotency ------------------------------------------------------------------------


def test_retried_batch_keeps_its_idempotency_key(plexus_receiver):
    plexus_receiver.fail_next(2, status=503)
    with make_client(plexus_receiver) as px:
        px.send("t", 1.0)
        px.flush_buffer()
        px.send("t", 2.0)
        px.flush_buffer()
    keys = [r.idempotency_key for r in plexus_receiver.requests]
    assert len(keys) == 4 and all(keys)
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] != keys[0]


def test_unknown_outcome_duplicate_is_dropped_by_key(plexus_receiver):
    plexus_receiver.reset_next(1, after_store=True)
    with make_client(plexus_receiver) as px:
        px.send("t", 1.0)
        px.flush_buffer()
    assert plexus_receiver.count == 1
    assert plexus_receiver.duplicates == 1


# --- crash safety -----------------------------------------------------------------------

WRITER = """
import sys
from plexus import Plexus
px = Plexus(api_key="plx_test", source_id="rig-01", gateway_url=sys.argv[1],
            persistent_buffer=True, buffer_path=sys.argv[2], flush_interval=0.01)
i = 0
while True:
    px.send("seq", i)
    print(i, flush=True)
    i += 1
"""


def test_kill_9_mid_stream_loses_no_acknowledged_point(plexus_receiver, tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "buffer.db"
    plexus_receiver.go_down()  # nothing leaves before the kill
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, plexus_receiver.url, str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ},
    )
    acknowledged = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= 3000:
            break
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    acknowledged += [int(x) for x in rest.split()]
    plexus_receiver.come_up()
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
        px.flush_buffer()
    delivered = {p["value"] for p in plexus_receiver.points}
    assert set(acknowledged) <= delivered
    assert len(delivered) == plexus_receiver.count  # no duplicates either


def test_repr_and_errors_never_show_the_key(plexus_receiver):
    secret = "plx_SECRET_do_not_leak_123"
    px = make_client(plexus_receiver, api_key=secret)
    try:
        px.send("t", 1.0)
        with pytest.raises(AuthenticationError) as info:
            px.flush_buffer()
        assert secret not in str(info.value)
        assert secret not in repr(px)
        assert secret not in repr(px._sink)
    finally:
        px.close(timeout=0.1)
