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
        self.buf = MemoryBuffer(self.cap, when_full="drop_oldest")
        self.queue: collections.deque[int] = collections.deque()  # waiting, oldest first
        self.in_flight: list[tuple[object, list[int]]] = []
        self.dropped = 0
        self.next = 0
        self.resume: tuple[str, list[int]] | None = None

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
        resume, self.resume = self.resume, None
        if resume is not None and list(self.queue)[:len(resume[1])] == resume[1]:
            # The last batch given back, intact: the same points under the same key.
            expected = [self.queue.popleft() for _ in resume[1]]
            assert batch.key == resume[0]
        else:
            k = min(n, len(self.queue), in_flight_limit(self.cap))  # at most half the cap
            if newest:  # from the newest end, still in time order
                expected = [self.queue.pop() for _ in range(k)][::-1]
            else:
                expected = [self.queue.popleft() for _ in range(k)]
            assert resume is None or batch.key != resume[0]  # changed points, a new key
        assert [p[1] for p in batch.points] == expected
        assert all(batch.key != b.key for b, _ in self.in_flight)
        self.in_flight.append((batch, expected))

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10), release=st.booleans())
    def finish(self, i: int, release: bool) -> None:
        batch, points = self.in_flight.pop(i % len(self.in_flight))
        if release:
            self.buf.release(batch)
            self._released(points, batch.key)  # type: ignore[attr-defined]
        else:
            self.buf.ack(batch)

    def _released(self, points: list[int], key: str) -> None:
        # Buffer's contract: a released batch waits again "first in line", even one
        # taken from the newest end, and can be dropped like any waiting point.
        self.queue.extendleft(reversed(points))
        self._drop_excess()
        self.resume = (key, points)

    @invariant()
    def counts_match(self) -> None:
        in_flight = sum(len(p) for _, p in self.in_flight)
        assert len(self.buf) == len(self.queue) + in_flight
        assert self.buf.dropped == self.dropped

    @invariant()
    def stays_within_its_cap(self) -> None:
        assert len(self.buf) <= self.cap, f"{len(self.buf)} points in a buffer capped at {self.cap}"


class SqliteBufferMachine(RuleBasedStateMachine):
    """SqliteBuffer (no cap reached): exactly the pending points, in whole blocks, across reopen.

    The model: points put since the last move into SQLite wait in ``unmoved``; a
    move (at a sync, a take, or a close) turns them into one block. ``take``
    returns whole blocks, oldest first (or newest first, still in time order),
    as many as fit in ``n`` points but at least one. A batch given back, or in
    flight at a crash, comes back first, with its key, before anything else.
    """

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="plexus-sqlite-machine-")
        self.path = os.path.join(self.dir, "b.db")
        self.buf = SqliteBuffer(self.path, sync_interval=3600)
        self.unmoved: list[int] = []
        self.blocks: list[tuple[int, list[int]]] = []  # (order, points): stored, waiting
        self.order = 0
        self.in_flight: tuple[object, list[tuple[int, list[int]]]] | None = None
        self.resume: tuple[str, list[tuple[int, list[int]]]] | None = None
        self.next = 0

    def _move(self) -> None:
        if self.unmoved:
            self.blocks.append((self.order, self.unmoved))
            self.order += 1
            self.unmoved = []

    @rule(n=st.integers(1, 5))
    def put(self, n: int) -> None:
        for _ in range(n):
            self.buf.put(pt(self.next))
            self.unmoved.append(self.next)
            self.next += 1

    @rule(n=st.integers(1, 20))
    def put_many(self, n: int) -> None:
        self.buf.put_many([pt(self.next + i) for i in range(n)])
        self.unmoved += range(self.next, self.next + n)
        self.next += n

    @rule()
    def sync(self) -> None:
        self.buf.sync()
        self._move()

    @precondition(lambda self: self.in_flight is None)
    @rule(n=st.integers(1, 30), newest=st.booleans())
    def take(self, n: int, newest: bool) -> None:
        batch = self.buf.take(n, newest=newest)
        self._move()
        if self.resume is not None:
            key, chosen = self.resume
            self.resume = None
            assert batch is not None and batch.key == key
        else:
            if not self.blocks:
                assert batch is None
                return
            assert batch is not None
            ordered = self.blocks[::-1] if newest else self.blocks
            chosen, points = [], 0
            for block in ordered:
                if chosen and points + len(block[1]) > n:
                    break
                chosen.append(block)
                points += len(block[1])
            chosen.sort()
        assert [p[1] for p in batch.points] == [v for _, b in chosen for v in b]
        assert batch.count == sum(len(b) for _, b in chosen)
        self.blocks = [b for b in self.blocks if b not in chosen]
        self.in_flight = (batch, chosen)

    @precondition(lambda self: self.in_flight is not None)
    @rule(release=st.booleans())
    def finish(self, release: bool) -> None:
        assert self.in_flight is not None
        batch, chosen = self.in_flight
        self.in_flight = None
        if release:
            self.buf.release(batch)
            self.blocks = sorted(self.blocks + chosen)
            self.resume = (batch.key, chosen)  # type: ignore[attr-defined]
        else:
            self.buf.ack(batch)

    @rule()
    def crash(self) -> None:
        """close + reopen: a batch taken and not acknowledged comes back first, same key."""
        self.buf.close()
        self._move()
        if self.in_flight is not None:
            batch, chosen = self.in_flight
            self.blocks = sorted(self.blocks + chosen)
            self.resume = (batch.key, chosen)  # type: ignore[attr-defined]
            self.in_flight = None
        self.buf = SqliteBuffer(self.path, sync_interval=3600)

    @invariant()
    def count_matches(self) -> None:
        held = len(self.unmoved) + sum(len(b) for _, b in self.blocks)
        if self.in_flight is not None:
            held += sum(len(b) for _, b in self.in_flight[1])
        assert len(self.buf) == held

    def teardown(self) -> None:
        try:
            if self.in_flight is not None:
                self.buf.release(self.in_flight[0])  # type: ignore[arg-type]
                self.blocks = sorted(self.blocks + self.in_flight[1])
            expected = collections.Counter(self.unmoved + [v for _, b in self.blocks for v in b])
            assert collections.Counter(drain(self.buf)) == expected
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


def test_inbox_stays_small_under_a_steady_stream(plexus_receiver, tmp_path, monkeypatch):
    """The inbox holds only the last rounds' segments, however long the stream."""
    from plexus import inbox

    monkeypatch.setattr(inbox, "SEGMENT_BYTES", 64 * 1024)  # rotate often
    path = tmp_path / "b.db"
    sent, most = 0, 0
    with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                     flush_interval=0.02, sync_interval=0.05) as px:
        # 15,000 points in steps of 100 (a steady stream of ~5,000 points/s on an idle
        # machine): about 600 KB of records, ten segments' worth, however fast it goes.
        while sent < 15_000:
            for _ in range(100):
                px.send("seq", sent)
                sent += 1
            most = max(most, len(list(tmp_path.glob("b.db.inbox.*"))))
            time.sleep(0.02)
        px.flush_buffer(timeout=30)
    # The one being written, the spare made ahead of it, and the ones sealed since the
    # last checkpoint (a round of 50 ms at most here).
    assert most <= 4, f"{most} inbox segments at once"
    assert not list(tmp_path.glob("b.db.inbox.*")), "a closed buffer leaves no inbox behind"
    assert sorted(values(plexus_receiver)) == list(range(sent))


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
