"""Damage inside the persistent buffer's files never stops delivery.

What a power cut (or a failing SD card) can leave: an inbox file whose tail
is zeros or garbage, a stored row that does not decode, such a row inside the
batch that was in flight. Each must cost at most the damaged points (counted
as lost, with a reason) and never the points after them.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.buffer import MemoryBuffer
from plexus.pipeline import Pipeline
from plexus.sinks.http import HttpSink
from plexus.sqlite_buffer import SqliteBuffer, decode_records, encode_record
from tests.reliability.support import KEY, LogCapture, make_client, values, wait_until

POINTS = st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(-10**6, 10**6),
                            st.integers(0, 2**40), st.none()), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(points=POINTS, cut=st.integers(min_value=0), damage=st.sampled_from(["zeros", "flip"]))
def test_damaged_inbox_bytes_decode_to_a_prefix(points, cut, damage):
    records = [encode_record(p) for p in points]
    blob = bytearray(b"".join(records))
    at = cut % len(blob)
    if damage == "zeros":  # the file's size reached the disk, its data did not
        blob[at:] = bytes(len(blob) - at)
    else:
        blob[at] ^= 0x5A
    payloads, used, invalid = decode_records(bytes(blob))
    whole = [r[10:] for r in records]
    assert payloads == whole[:len(payloads)]
    assert invalid == (used != len(blob))
    assert sum(len(r) for r in records[:len(payloads)]) == used


def test_zeros_are_not_records():
    assert decode_records(bytes(4096)) == ([], 0, True)


def _stored(path: Path, n: int) -> None:
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many([("seq", i, 1700000000000 + i, None) for i in range(n)])
    buf.close()


def test_an_inbox_ending_in_zeros_is_read_up_to_them(plexus_receiver, tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 10)
    # Points written after the last move, then a zero tail (the size reached the disk,
    # the data did not): what 12 of 13 power-cut images held.
    inbox = Path(f"{path}.inbox.50")
    inbox.write_bytes(b"".join(encode_record(("seq", i, 1700000000000 + i, None))
                               for i in range(10, 20)) + bytes(6144))
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            assert px._buffer.torn_records == 1
            px.flush_buffer(timeout=10)
    assert sorted(values(plexus_receiver)) == list(range(20))
    warnings = [line for line in logs.lines if "not whole records" in line]
    assert len(warnings) == 1 and "6144 bytes" in warnings[0], warnings


def _damage_row(path: Path, row_id: int, data: bytes, in_flight: str | None = None) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE points SET data = ? WHERE id = ?", (data, row_id))
    if in_flight:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('in_flight', ?)", (in_flight,))
    conn.commit()
    conn.close()


def _deliver_damaged(receiver, path: Path) -> tuple[dict[str, int], str]:
    with LogCapture() as logs:
        with make_client(receiver, persistent_buffer=True, buffer_path=path) as px:
            px.flush_buffer(timeout=10)
            lost = dict(px._buffer.lost)
            px.send("after", 1)
    return lost, logs.text


def test_a_row_that_does_not_decode_is_set_aside_and_delivery_goes_on(plexus_receiver,
                                                                      tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 20)
    _damage_row(path, 5, b"")  # orjson.loads(b"") fails, as in the wedged images
    _damage_row(path, 6, b'{"not": "a point"}')
    lost, log_text = _deliver_damaged(plexus_receiver, path)
    assert sorted(values(plexus_receiver, "seq")) == [i for i in range(20) if i not in (4, 5)]
    assert plexus_receiver.wait_for(19)
    assert values(plexus_receiver, "after") == [1]
    assert lost == {"undecodable": 2}
    assert "could not be decoded" in log_text and "uploader" not in log_text.lower()
    conn = sqlite3.connect(path)
    kept = conn.execute("SELECT id, reason FROM set_aside ORDER BY id").fetchall()
    conn.close()
    assert [r[0] for r in kept] == [5, 6] and all("undecodable" in r[1] for r in kept)


def test_a_damaged_row_in_the_batch_in_flight_does_not_wedge_restarts(plexus_receiver,
                                                                     tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 20)
    # The batch in flight when the power went holds the damaged row: every restart
    # sends that batch first.
    _damage_row(path, 1, bytes(8), in_flight="1-10")
    for _ in range(2):
        lost, _ = _deliver_damaged(plexus_receiver, path)
    assert sorted(values(plexus_receiver, "seq")) == list(range(1, 20))
    assert values(plexus_receiver, "after") == [1, 1]


class _TakeFailsOnce(MemoryBuffer):
    """A buffer with a bug that shows once: the uploader must outlive it."""

    failed = False

    def take(self, max_points, newest=False):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise RuntimeError("planted bug")
        return super().take(max_points, newest)


def test_an_unexpected_error_never_kills_the_uploader(plexus_receiver, caplog):
    pipeline = Pipeline("rig-01")
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    lane = pipeline.add_lane(sink, _TakeFailsOnce(), interval=0.05)
    with caplog.at_level(logging.ERROR, logger="plexus.uploader"):
        pipeline.start()
        try:
            for i in range(5):
                pipeline.emit("seq", i)
            assert wait_until(lambda: plexus_receiver.count == 5, timeout=10)
            assert lane.uploader.running
        finally:
            pipeline.close()
    assert any("planted bug" in r.getMessage() and "goes on" in r.getMessage()
               for r in caplog.records)
