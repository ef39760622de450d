"""Faults on the way to the platform, injected at the local receiver.

Every test counts what was sent against what the receiver stored, exactly:
each acknowledged point must be stored once (the receiver drops repeated
requests by Idempotency-Key), and every request the receiver recognised as a
repeat must repeat one whose outcome the client could not know (a reset after
storing, or an answer that came after the client's timeout).
"""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest

from plexus import AuthenticationError, DeliveryError, RetryPolicy
from tests.reliability.conftest import record_figure
from tests.reliability.support import (
    assert_duplicates_only_from_unknown_outcomes,
    duplicates_stored,
    make_client,
    values,
    wait_until,
)


def flush_until_empty(px, attempts: int = 200) -> None:
    """flush_buffer() until the buffer is empty; a flush that raises (the fault
    is still going on) is simply tried again, as an application would."""
    for _ in range(attempts):
        try:
            if px.flush_buffer(timeout=30):
                return
        except (DeliveryError, AuthenticationError):
            time.sleep(0.02)
    raise AssertionError(f"still {px.buffer_size()} points buffered after {attempts} flushes")


def send_in_chunks(px, receiver, chunks: int, per_chunk: int, fault, *, pause: float = 0.02):
    """Send ``chunks`` x ``per_chunk`` sequence points, calling ``fault(receiver, chunk)``
    before each chunk. Returns the values whose send() returned (or raised
    AuthenticationError, which the docs say still buffers the point)."""
    acknowledged = []
    n = 0
    for chunk in range(chunks):
        fault(receiver, chunk)
        for _ in range(per_chunk):
            try:
                px.send("seq", n)
            except AuthenticationError:
                pass  # documented: the point is buffered and sent once a key is accepted
            acknowledged.append(n)
            n += 1
        time.sleep(pause)
    return acknowledged


def check_exact(receiver, px, acknowledged) -> dict[str, int]:
    stored = values(receiver, "seq")
    dupes = duplicates_stored(stored)
    assert not dupes, f"stored more than once: {sorted(dupes)[:20]}"
    missing = sorted(set(acknowledged) - set(stored))
    assert not missing, f"{len(missing)} acknowledged points never delivered: {missing[:20]}"
    assert sorted(stored) == sorted(acknowledged)
    dup_requests = assert_duplicates_only_from_unknown_outcomes(receiver)
    assert px.stats.delivered == len(acknowledged)
    return {"sent": len(acknowledged), "stored": len(stored), "duplicate_requests": dup_requests,
            "requests": len(receiver.requests)}


def _burst(status):
    def fault(rx, chunk):
        if chunk % 3 == 1:
            rx.fail_next(6, status=status)  # more than 1 + retries: the uploader gives up once
    return fault


def _timeouts(rx, chunk):
    if chunk % 3 == 1:
        rx.delay_next(2, 0.5)  # the client times out after 0.2 s; the receiver still stores


def _slow(rx, chunk):
    if chunk % 2:
        rx.delay_next(3, 0.15)  # slower than usual, within the client's timeout


def _resets_before(rx, chunk):
    if chunk % 3 == 1:
        rx.reset_next(3)


def _resets_after_store(rx, chunk):
    if chunk % 3 == 1:
        rx.reset_next(2, after_store=True)


FAULTS = {
    "500-burst": (_burst(500), {}),
    "502-burst": (_burst(502), {}),
    "503-burst": (_burst(503), {}),
    "timeouts": (_timeouts, {"timeout": 0.2}),
    "slow-responses": (_slow, {}),
    "resets-before-processing": (_resets_before, {}),
    "resets-after-store": (_resets_after_store, {}),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_bursts_lose_nothing_and_duplicate_only_unknown_outcomes(plexus_receiver, name):
    fault, kwargs = FAULTS[name]
    px = make_client(plexus_receiver, max_buffer_points=100_000, **kwargs)
    try:
        acknowledged = send_in_chunks(px, plexus_receiver, chunks=9, per_chunk=300, fault=fault)
        flush_until_empty(px)
    finally:
        px.close()
    figures = check_exact(plexus_receiver, px, acknowledged)
    injected = [r for r in plexus_receiver.requests if r.fault]
    assert injected, "the fault was never exercised"
    if name in ("timeouts", "resets-after-store"):
        assert figures["duplicate_requests"] >= 1  # unknown outcomes did happen and were deduplicated
    record_figure(f"fault {name}", figures)


def test_receiver_down_for_a_while_then_back(plexus_receiver):
    px = make_client(plexus_receiver, max_buffer_points=100_000)
    down_requests = []

    def outage(rx, chunk):
        if chunk == 2:
            rx.go_down()
        if chunk == 7:
            down_requests.append(len(rx.requests))
            rx.come_up()

    try:
        acknowledged = send_in_chunks(px, plexus_receiver, chunks=10, per_chunk=300,
                                      fault=outage, pause=0.1)
        flush_until_empty(px)
    finally:
        px.close()
    figures = check_exact(plexus_receiver, px, acknowledged)
    assert px.stats.failures >= 1  # the outage was seen
    record_figure("fault receiver-down-then-up", figures)


def test_401_for_a_while_then_accepted(plexus_receiver):
    """401 answers (e.g. the gateway's own key check failing transiently) keep the data;
    flush_buffer() retries at once, send() raises but still buffers."""
    px = make_client(plexus_receiver, max_buffer_points=100_000)
    raised = []

    def refuse(rx, chunk):
        if chunk == 2:
            rx.reject_keys_next(5)

    try:
        acknowledged = send_in_chunks(px, plexus_receiver, chunks=6, per_chunk=300, fault=refuse)
        for _ in range(50):
            try:
                px.flush_buffer(timeout=30)
                break
            except AuthenticationError as exc:
                raised.append(exc)
    finally:
        px.close()
    figures = check_exact(plexus_receiver, px, acknowledged)
    assert [r.status for r in plexus_receiver.requests].count(401) == 5
    assert px.stats.delivered == len(acknowledged)
    figures["flushes_that_raised_auth_error"] = len(raised)
    record_figure("fault 401-then-accepted", figures)


def test_401_period_recovers_without_flush(plexus_receiver):
    """Without flush() the uploader tries a refused key again every auth_retry_interval,
    which defaults to retry.max_delay (30 s by default; 0.05 s with this test's policy)."""
    px = make_client(plexus_receiver)
    plexus_receiver.reject_keys_next(3)
    try:
        for i in range(200):
            try:
                px.send("seq", i)
            except AuthenticationError:
                pass
        assert wait_until(lambda: plexus_receiver.count == 200, timeout=20)
    finally:
        px.close()
    assert sorted(values(plexus_receiver)) == list(range(200))


def test_chaos_mix_of_every_fault(plexus_receiver, slow):
    rng = random.Random(1234)
    chunks = 60 if slow else 15

    def chaos(rx, chunk):
        kind = rng.choice(["none", "fail", "delay", "reset", "reset_after", "slow", "401", "down"])
        if kind == "fail":
            rx.fail_next(rng.randint(1, 6), status=rng.choice([500, 502, 503]))
        elif kind == "delay":
            rx.delay_next(rng.randint(1, 2), 0.4)
        elif kind == "slow":
            rx.delay_next(rng.randint(1, 3), 0.05)
        elif kind == "reset":
            rx.reset_next(rng.randint(1, 3))
        elif kind == "reset_after":
            rx.reset_next(rng.randint(1, 3), after_store=True)
        elif kind == "401":
            rx.reject_keys_next(rng.randint(1, 3))
        elif kind == "down":
            rx.go_down()
            threading.Timer(rng.uniform(0.05, 0.3), rx.come_up).start()

    px = make_client(plexus_receiver, max_buffer_points=1_000_000, timeout=0.2)
    try:
        acknowledged = send_in_chunks(px, plexus_receiver, chunks=chunks, per_chunk=200,
                                      fault=chaos, pause=0.05)
        time.sleep(0.4)
        plexus_receiver.come_up()
        flush_until_empty(px)
    finally:
        px.close()
    record_figure("fault chaos-mix", check_exact(plexus_receiver, px, acknowledged))


# --- a bad point among many ---------------------------------------------------------------


def test_one_invalid_point_among_10000_is_dropped_counted_and_logged(
        plexus_receiver_factory, caplog):
    bad_value = 4321
    rx = plexus_receiver_factory(
        extra_check=lambda p: "value 4321 is cursed" if p.get("value") == bad_value else None)
    caplog.set_level(logging.WARNING)
    with make_client(rx, max_buffer_points=100_000) as px:
        for i in range(10_000):
            px.send("seq", i)  # valid for the client: only this receiver is stricter
        px.flush_buffer(timeout=60)
        # The queue is not wedged behind it: later points flow as before.
        for i in range(10_000, 10_100):
            px.send("seq", i)
        px.flush_buffer(timeout=60)
        assert px.buffer_size() == 0
        assert px.stats.rejected == 1
        assert "cursed" in (px.stats.last_rejection or "")
    stored = values(rx)
    assert not duplicates_stored(stored)
    assert sorted(stored) == [i for i in range(10_100) if i != bad_value]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("cursed" in m and "dropped" in m for m in warnings), warnings
    record_figure("bad point among 10,000", {"sent": 10_100, "stored": len(stored),
                                             "rejected": 1, "requests": len(rx.requests)})


# --- 413 ----------------------------------------------------------------------------------


def test_413_splits_until_it_fits_and_loses_nothing(plexus_receiver_factory):
    rx = plexus_receiver_factory(max_body_bytes=16 * 1024)
    with make_client(rx, flush_interval=60, batch_size=100_000) as px:
        for i in range(10_000):
            px.send("seq", i, tags={"pad": "x" * 20})
        px.flush_buffer(timeout=60)
        assert px.stats.rejected == 0
    stored = values(rx)
    assert sorted(stored) == list(range(10_000))
    statuses = [r.status for r in rx.requests]
    assert 413 in statuses and statuses.count(200) >= 2
    assert all(r.status in (200, 413) for r in rx.requests)
    assert max(r.points for r in rx.requests if r.status == 200) < 10_000
    record_figure("413 split", {"sent": 10_000, "stored": len(stored),
                                "requests_413": statuses.count(413),
                                "requests_200": statuses.count(200)})


def test_413_for_a_single_point_drops_only_that_point(plexus_receiver_factory, caplog):
    rx = plexus_receiver_factory(max_body_bytes=400)
    caplog.set_level(logging.WARNING)
    with make_client(rx, flush_interval=60, batch_size=100_000) as px:
        for i in range(20):
            px.send("seq", i)
        px.send("big", "y" * 250, tags={"pad": "z" * 200})  # valid, but over this receiver's limit
        for i in range(20, 40):
            px.send("seq", i)
        px.flush_buffer(timeout=60)
        assert px.stats.rejected == 1
    assert sorted(values(rx, "seq")) == list(range(40))
    assert values(rx, "big") == []
    assert any("413" in r.getMessage() for r in caplog.records)


# --- long outages: drop policies -------------------------------------------------------------


def kept_is_in_flight_run_plus_newest(kept: list[int], sent: int, count: int) -> int:
    """The points kept through an overflow are, at most, one run that was on the wire
    while the oldest were dropped (never dropped, since it was out of the waiting
    points), plus the newest. Returns the size of that run (0 when there was none)."""
    kept = sorted(kept)
    assert len(kept) == count and len(set(kept)) == count  # count: how many were kept
    newest = 0
    while newest < len(kept) and kept[-1 - newest] == sent - 1 - newest:
        newest += 1
    run = kept[:len(kept) - newest]
    assert run == list(range(run[0], run[0] + len(run))) if run else True, "not drop-oldest"
    return len(run)


def test_memory_buffer_long_outage_drops_oldest_with_exact_count(plexus_receiver):
    cap, sent = 5_000, 40_000
    plexus_receiver.go_down()
    px = make_client(plexus_receiver, max_buffer_points=cap)
    try:
        for i in range(sent):
            px.send("seq", i)
        buffered, dropped = px.buffer_size(), px.dropped
        plexus_receiver.come_up()
        flush_until_empty(px)
    finally:
        plexus_receiver.come_up()
        px.close()
    kept = values(plexus_receiver)
    assert not duplicates_stored(kept)
    assert dropped + len(kept) == sent  # every point is delivered or counted as dropped
    assert sent - 1 in kept  # the newest survive
    record_figure("memory outage", {"sent": sent, "cap": cap, "dropped": dropped,
                                    "delivered": len(kept), "buffered_at_end": buffered})
    assert buffered == cap and dropped == sent - cap


def test_persistent_buffer_keeps_everything_up_to_its_cap(plexus_receiver, tmp_path):
    cap = 3_000
    plexus_receiver.go_down()
    px = make_client(plexus_receiver, persistent_buffer=True, buffer_path=tmp_path / "b.db",
                     max_buffer_points=cap, sync_interval=0.02)
    try:
        for i in range(cap):
            px.send("seq", i)
        time.sleep(0.1)  # several sync rounds
        assert px.dropped == 0 and px.buffer_size() == cap
        plexus_receiver.come_up()
        flush_until_empty(px)
    finally:
        px.close()
    assert sorted(values(plexus_receiver)) == list(range(cap))


@pytest.mark.parametrize("cap,sent", [
    (20_000, 50_000),
], ids=["cap-above-batch"])  # a cap below the batch size: see test_buffers.py
def test_persistent_buffer_beyond_its_cap_drops_oldest_counted(plexus_receiver, tmp_path,
                                                                cap, sent):
    plexus_receiver.go_down()
    path = tmp_path / "b.db"
    px = make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                     max_buffer_points=cap, sync_interval=0.02, close_timeout=0.5)
    try:
        for i in range(sent):
            px.send("seq", i)
        # The trim runs in the sync thread, so the count comes down within a round.
        assert wait_until(lambda: px.buffer_size() <= cap, timeout=5), px.buffer_size()
        held = px.buffer_size()
        # Whole stored blocks are dropped (at most a quarter of the cap each), and
        # every point is either held or counted.
        assert cap - held < px._buffer.block_points, (cap, held)
        assert px.dropped == sent - held
        plexus_receiver.come_up()
        flush_until_empty(px)
    finally:
        plexus_receiver.come_up()
        px.close()
    kept = values(plexus_receiver)
    in_flight = kept_is_in_flight_run_plus_newest(kept, sent, held)
    record_figure(f"persistent outage cap={cap}", {
        "sent": sent, "cap": cap, "dropped": px.dropped, "delivered": len(kept),
        "kept_in_flight": in_flight})


# --- backlog drain after an outage ----------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "sqlite"])
def test_backlog_drain_and_how_long_live_points_wait(plexus_receiver_factory, tmp_path,
                                                     persistent, slow):
    backlog = 400_000 if slow else 200_000
    arrivals: dict[int, float] = {}

    stored_before: dict[int, int] = {}

    def note_live(p):
        if p.get("metric") == "live":
            arrivals.setdefault(p["value"], time.monotonic())
            stored_before.setdefault(p["value"], rx.count)
        return None

    rx = plexus_receiver_factory(extra_check=note_live, store=True)
    rx.go_down()
    options = {"persistent_buffer": True, "buffer_path": tmp_path / "b.db"} if persistent else {}
    px = make_client(rx, max_buffer_points=backlog + 100_000,
                     retry=RetryPolicy(retries=1, base=0.01, max_delay=0.05), **options)
    sent_at: dict[int, float] = {}
    try:
        chunk = [("backlog", 0.0)] * 1000
        for _ in range(backlog // 1000):
            px.send_batch(chunk)
        rx.come_up()
        t0 = time.monotonic()
        live = 0
        while rx.count < backlog and time.monotonic() - t0 < 120:
            sent_at[live] = time.monotonic()
            px.send("live", live)
            live += 1
            time.sleep(0.01)
        drained = time.monotonic() - t0
        flush_until_empty(px)
    finally:
        px.close()
    assert rx.count == backlog + live
    assert sorted(values(rx, "live")) == list(range(live))
    waits = sorted(arrivals[i] - sent_at[i] for i in range(live))
    first_wait = arrivals[0] - sent_at[0]
    requests = [r for r in rx.requests if r.status == 200]
    kind = "sqlite" if persistent else "memory"
    # Not starved: the first live point is stored while most of the backlog still waits
    # (the policy alternates oldest-end and newest-end batches while a backlog waits).
    assert stored_before[0] < backlog // 2, (
        f"the first live point waited behind {stored_before[0]} backlog points")
    record_figure(f"backlog drain {kind}", {
        "backlog_points": backlog, "drain_s": round(drained, 2),
        "requests": len(requests), "largest_request": max(r.points for r in requests),
        "live_points": live, "first_live_wait_s": round(first_wait, 2),
        "backlog_stored_before_first_live": stored_before[0],
        "median_live_wait_s": round(waits[len(waits) // 2], 2),
        "max_live_wait_s": round(waits[-1], 2)})
