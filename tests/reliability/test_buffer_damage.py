"""Damage inside the persistent buffer's files never stops delivery.

What a power cut (or a failing SD card) can leave: an inbox segment whose
tail is zeros or garbage, a stored block that fails its checksum, such a
block inside the batch that was in flight. Each must cost at most the
damaged points (counted as lost, with a reason) and never the points after
them.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from plexus import inbox
from plexus.buffer import MemoryBuffer
from plexus.codec import POINTS
from plexus.pipeline import Pipeline
from plexus.sinks.http import HttpSink
from plexus.sqlite_buffer import SqliteBuffer
from tests.reliability.support import KEY, LogCapture, make_client, values, wait_until

PAYLOADS = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(payloads=PAYLOADS, cut=st.integers(min_value=0), damage=st.sampled_from(["zeros", "flip"]))
def test_damaged_inbox_bytes_decode_to_a_prefix(payloads, cut, damage):
    records = [inbox.frame(p) for p in payloads]
    original = b"".join(records)
    blob = bytearray(original)
    at = cut % len(blob)
    if damage == "zeros":  # the file's size reached the disk, its data did not
        blob[at:] = bytes(len(blob) - at)
    else:
        blob[at] ^= 0x5A
    decoded, used = inbox.decode(bytes(blob))
    assert decoded == payloads[:len(decoded)]
    assert sum(len(r) for r in records[:len(decoded)]) == used
    changed = next((i for i, (a, b) in enumerate(zip(original, blob, strict=True))
                    if a != b), len(blob))
    # No record that holds a damaged byte is taken (a byte zeroed that was zero
    # already is no damage).
    assert used <= changed or used == len(original) and changed == len(blob)


def test_zeros_are_not_records():
    assert inbox.decode(bytes(4096)) == ([], 0)


def _stored(path: Path, n: int, blocks: int = 1) -> None:
    buf = SqliteBuffer(path, sync_interval=3600)
    per = n // blocks
    for b in range(blocks):
        buf.put_many([("seq", i, 1700000000000 + i, None) for i in range(b * per, (b + 1) * per)])
        buf.sync()  # each move makes one block
    buf.close()


def test_a_segment_ending_in_zeros_is_read_up_to_them(plexus_receiver, tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 10)
    # Points written after the last move, then a zero tail with a few garbage bytes
    # in it (the size reached the disk, the data did not): what 12 of 13 power-cut
    # images of the first report held.
    records = b"".join(inbox.frame(POINTS.record(("seq", i, 1700000000000 + i, None)))
                       for i in range(10, 20))
    damage = bytes(100) + b"\x13\x37" + bytes(4000)
    inbox.segment_path(path, 50).write_bytes(inbox.header(POINTS.tag) + records + damage)
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            assert px._buffer.torn_records == 1
            px.flush_buffer(timeout=10)
    assert sorted(values(plexus_receiver)) == list(range(20))
    warnings = [line for line in logs.lines if "are not records" in line]
    assert len(warnings) == 1 and "102 bytes" in warnings[0], warnings


def test_records_after_a_segment_cut_short_are_discarded_to_keep_a_prefix(plexus_receiver,
                                                                         tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 10)
    frame = inbox.frame
    first = b"".join(frame(POINTS.record(("seq", i, 1, None))) for i in range(10, 15))
    later = b"".join(frame(POINTS.record(("seq", i, 1, None))) for i in range(20, 25))
    # Segment 50 lost its tail (points 15..19) and its seal; 51 reached the disk.
    inbox.segment_path(path, 50).write_bytes(inbox.header(POINTS.tag) + first + bytes(512))
    inbox.segment_path(path, 51).write_bytes(inbox.header(POINTS.tag) + later + bytes(512))
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            assert px._buffer.lost == {"after a gap": 5}
            px.flush_buffer(timeout=10)
    assert sorted(values(plexus_receiver)) == list(range(15))  # a prefix, no hole
    assert "so that what is kept stays in order" in logs.text


def _damage_block(path: Path, block_id: int, in_flight: str | None = None) -> None:
    conn = sqlite3.connect(path)
    data = conn.execute("SELECT data FROM blocks WHERE id = ?", (block_id,)).fetchone()[0]
    flipped = bytes([data[0] ^ 0xFF]) + data[1:]
    conn.execute("UPDATE blocks SET data = ? WHERE id = ?", (flipped, block_id))
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


def test_a_block_that_fails_its_check_is_set_aside_and_delivery_goes_on(plexus_receiver,
                                                                        tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 40, blocks=4)
    _damage_block(path, 2)  # points 10..19
    lost, log_text = _deliver_damaged(plexus_receiver, path)
    assert sorted(values(plexus_receiver, "seq")) == [i for i in range(40) if not 10 <= i < 20]
    assert values(plexus_receiver, "after") == [1]
    assert lost == {"unreadable": 10}
    assert "could not be read back" in log_text and "unexpected error" not in log_text
    conn = sqlite3.connect(path)
    kept = conn.execute("SELECT id, reason FROM set_aside ORDER BY id").fetchall()
    conn.close()
    assert [r[0] for r in kept] == [2] and "CRC" in kept[0][1]


def test_a_damaged_block_in_the_batch_in_flight_does_not_wedge_restarts(plexus_receiver,
                                                                       tmp_path):
    path = tmp_path / "b.db"
    _stored(path, 40, blocks=4)
    # The batch in flight when the power went holds the damaged block: every restart
    # takes that batch first.
    _damage_block(path, 1, in_flight="1-4-40")
    for _ in range(2):
        _deliver_damaged(plexus_receiver, path)
    assert sorted(values(plexus_receiver, "seq")) == list(range(10, 40))
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
