"""The buffers on their own: model-based property tests, batch keys, bounds.

The state machines drive MemoryBuffer and SqliteBuffer through random
interleavings of put / put_many / take / ack / release (and, for SqliteBuffer,
close + reopen as a crash stand-in) against a plain Python model of what must
be pending, and check after every step that the buffer holds exactly the
model's multiset of points.
"""

from __future__ import annotations

import collections
import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from plexus.buffer import MemoryBuffer, in_flight_limit
from plexus.sqlite_buffer import SqliteBuffer
from tests.reliability.conftest import slow_enabled
from tests.reliability.support import duplicates_stored, make_client, values

EXAMPLES = 200 if slow_enabled() else 25
STEPS = 60 if slow_enabled() else 30


def pt(n: int):
    return ("seq", n, 1700000000000 + n, None)


def drain(buf) -> list[int]:
    out = []
    while True:
        batch = buf.take(10**6)
        if batch is None:
            return out
        out += [p[1] for p in batch.points]
        buf.ack(batch)


# --- model-based tests ------------------------------------------------------------------------


class MemoryBufferMachine(RuleBasedStateMachine):
    """MemoryBuffer with a small cap: drop-oldest of the waiting points, exactly counted.

    The model: new points join the queue, then the oldest waiting points beyond the cap
    (which counts the batches in flight) are dropped, so len() never exceeds the cap and,
    when batches in flight fill it, a new point is itself the oldest waiting one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cap = 12
        self.buf = MemoryBuffer(self.cap)
        self.queue: collections.deque[int] = collections.deque()  # waiting, oldest first
        self.in_flight: list[tuple[object, list[int]]] = []
        self.dropped = 0
        self.next = 0

    def _drop_excess(self) -> None:
        overflow = len(self.queue) + sum(len(p) for _, p in self.in_flight) - self.cap
        for _ in range(min(max(0, overflow), len(self.queue))):
            self.queue.popleft()
            self.dropped += 1

    @rule()
    def put(self) -> None:
        self.buf.put(pt(self.next))
        self.queue.append(self.next)
        self.next += 1
        self._drop_excess()

    @rule(n=st.integers(1, 20))
    def put_many(self, n: int) -> None:
        self.buf.put_many([pt(self.next + i) for i in range(n)])
        self.queue.extend(range(self.next, self.next + n))
        self.next += n
        self._drop_excess()

    @rule(n=st.integers(1, 15), newest=st.booleans())
    def take(self, n: int, newest: bool) -> None:
        batch = self.buf.take(n, newest=newest)
        if not self.queue:
            assert batch is None
            return
        assert batch is not None
        k = min(n, len(self.queue), in_flight_limit(self.cap))  # a batch: at most half the cap
        if newest:  # from the newest end, still in time order
            expected = [self.queue.pop() for _ in range(k)][::-1]
        else:
            expected = [self.queue.popleft() for _ in range(k)]
        assert [p[1] for p in batch.points] == expected
        assert all(batch.key != b.key for b, _ in self.in_flight)
        self.in_flight.append((batch, expected))

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10), release=st.booleans())
    def finish(self, i: int, release: bool) -> None:
        batch, points = self.in_flight.pop(i % len(self.in_flight))
        if release:
            self.buf.release(batch)
            self._released(points)
        else:
            self.buf.ack(batch)

    def _released(self, points: list[int]) -> None:
        # Buffer's contract: a released batch is sent again "first in line", even one
        # taken from the newest end.
        self.queue.extendleft(reversed(points))

    @invariant()
    def counts_match(self) -> None:
        in_flight = sum(len(p) for _, p in self.in_flight)
        assert len(self.buf) == len(self.queue) + in_flight
        assert self.buf.dropped == self.dropped

    @invariant()
    def stays_within_its_cap(self) -> None:
        assert len(self.buf) <= self.cap, f"{len(self.buf)} points in a buffer capped at {self.cap}"


class SqliteBufferMachine(RuleBasedStateMachine):
    """SqliteBuffer (no cap reached): exactly the pending multiset, across reopen."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="plexus-sqlite-machine-")
        self.path = os.path.join(self.dir, "b.db")
        self.buf = SqliteBuffer(self.path, sync_interval=3600)
        self.pending: collections.Counter[int] = collections.Counter()
        self.in_flight: tuple[object, list[int]] | None = None
        self.keys_seen: dict[str, tuple[int, ...]] = {}
        self.next = 0
        self.resume: tuple[str, list[int]] | None = None  # in flight at the last crash
        self.last_taken: tuple[str, list[int]] | None = None  # taken and not acknowledged

    @rule(n=st.integers(1, 5))
    def put(self, n: int) -> None:
        for _ in range(n):
            self.buf.put(pt(self.next))
            self.pending[self.next] += 1
            self.next += 1

    @rule(n=st.integers(1, 20))
    def put_many(self, n: int) -> None:
        self.buf.put_many([pt(self.next + i) for i in range(n)])
        self.pending.update(range(self.next, self.next + n))
        self.next += n

    @rule()
    def sync(self) -> None:
        self.buf.sync()

    @precondition(lambda self: self.in_flight is None)
    @rule(n=st.integers(1, 30), newest=st.booleans())
    def take(self, n: int, newest: bool) -> None:
        batch = self.buf.take(n, newest=newest)
        waiting = sum(self.pending.values())
        if waiting == 0:
            assert batch is None
            return
        assert batch is not None
        got = [p[1] for p in batch.points]
        if self.resume is not None:
            # After a crash the batch that was in flight comes back first, as it was,
            # with the same key, so a receiver can drop the repeat.
            key, points = self.resume
            self.resume = None
            assert (batch.key, got) == (key, points)
            self.in_flight = (batch, got)
            self.last_taken = (batch.key, got)
            return
        assert len(got) == min(n, waiting, in_flight_limit(self.buf.max_points))
        waiting_sorted = sorted(self.pending.elements())
        if newest:
            assert got == waiting_sorted[-len(got):]  # the newest, in time order
        else:
            assert got == waiting_sorted[:len(got)]  # oldest first
        self.in_flight = (batch, got)
        self.last_taken = (batch.key, got)

    @precondition(lambda self: self.in_flight is not None)
    @rule(release=st.booleans())
    def finish(self, release: bool) -> None:
        assert self.in_flight is not None
        batch, got = self.in_flight
        self.in_flight = None
        if release:
            self.buf.release(batch)
        else:
            self.buf.ack(batch)
            self.pending.subtract(got)
            self.pending = +self.pending
            self.last_taken = None

    @rule()
    def crash(self) -> None:
        """close + reopen: an in-flight batch comes back, first and with its key."""
        self.buf.close()
        # Taken and never acknowledged (in flight, or given back): its outcome may be
        # unknown, so it comes back first, exactly as it was.
        self.resume = self.last_taken
        self.in_flight = None
        self.buf = SqliteBuffer(self.path, sync_interval=3600)

    @invariant()
    def count_matches(self) -> None:
        assert len(self.buf) == sum(self.pending.values())

    def teardown(self) -> None:
        try:
            if self.in_flight is not None:
                self.buf.release(self.in_flight[0])
            assert collections.Counter(drain(self.buf)) == self.pending
        finally:
            self.buf.close()
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


_settings = settings(
    database=None, max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def test_memory_buffer_model():
    run_state_machine_as_test(MemoryBufferMachine, settings=_settings)


def test_sqlite_buffer_model(tmp_path):
    run_state_machine_as_test(SqliteBufferMachine, settings=_settings)


# --- batch keys ---------------------------------------------------------------------------------


def test_persistent_buffer_gives_every_batch_its_own_key(plexus_receiver, tmp_path):
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=tmp_path / "b.db",
                     flush_interval=60) as px:
        for i in range(5):
            px.send("seq", i)
            px.flush_buffer(timeout=10)
        assert px.stats.delivered == 5
    keys = [r.idempotency_key for r in plexus_receiver.requests]
    assert len(set(keys)) == len(keys), keys
    assert sorted(values(plexus_receiver)) == list(range(5))


def test_steady_stream_through_the_persistent_buffer_delivers_everything(plexus_receiver,
                                                                         tmp_path):
    sent = 0
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=tmp_path / "b.db",
                     flush_interval=0.02, sync_interval=0.05) as px:
        for _ in range(150):
            for _ in range(20):
                px.send("seq", sent)
                sent += 1
            time.sleep(0.004)
        px.flush_buffer(timeout=30)
    stored = values(plexus_receiver)
    assert not duplicates_stored(stored)
    assert sorted(stored) == list(range(sent)), (
        f"{sent - len(set(stored))} of {sent} points missing; the receiver answered "
        f"{plexus_receiver.duplicates} requests as repeats")


def test_memory_buffer_gives_every_batch_its_own_key(plexus_receiver):
    with make_client(plexus_receiver, flush_interval=60) as px:
        for i in range(5):
            px.send("seq", i)
            px.flush_buffer(timeout=10)
    keys = [r.idempotency_key for r in plexus_receiver.requests]
    assert len(set(keys)) == 5
    assert sorted(values(plexus_receiver)) == list(range(5))


# --- bounds ---------------------------------------------------------------------------------------


def test_inbox_stays_small_under_a_steady_stream(plexus_receiver, tmp_path):
    """The inbox files hold only the last sync rounds' points, however long the stream."""
    path = tmp_path / "b.db"
    sent = 0
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                     flush_interval=0.02, sync_interval=0.05) as px:
        # A steady stream of 5,000 points/s over many sync rounds. (Far faster, the
        # producer outruns SQLite and the inbox rightly holds the backlog.)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            for _ in range(100):
                px.send("seq", sent)
                sent += 1
            time.sleep(0.02)
        inbox_bytes = sum(f.stat().st_size for f in tmp_path.glob("b.db.inbox.*"))
    per_point = 8 + len(b'["seq",9999,1700000009999,null]')  # header + JSON
    # Growing without bound would hold every point sent (100%); rotation keeps about
    # two sync rounds' worth.
    assert inbox_bytes < 0.25 * sent * per_point, (
        f"inbox holds {inbox_bytes} bytes after {sent} points (~{per_point} bytes each) "
        "went through")
    assert not list(tmp_path.glob("b.db.inbox.*")), "a closed buffer leaves no inbox behind"


def test_sqlite_buffer_never_holds_more_than_its_cap_after_a_sync(tmp_path):
    buf = SqliteBuffer(tmp_path / "b.db", max_points=1_000, sync_interval=3600)
    try:
        buf.put_many([pt(i) for i in range(3_000)])
        batch = buf.take(10_000)  # the uploader takes up to 10,000 points
        assert batch is not None
        buf.sync()  # the trim of the sync round
        assert len(buf) <= 1_000
        assert buf.dropped == 2_000
    finally:
        buf.close()
