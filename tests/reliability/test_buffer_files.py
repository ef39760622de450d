"""The persistent buffer's files: corrupt or unreadable at start, and a full disk."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from plexus.sqlite_buffer import SqliteBuffer
from tests.reliability.conftest import record_figure
from tests.reliability.support import LogCapture, child_env, make_client, values, wait_until


def _valid_buffer(path: Path, n: int = 2000) -> None:
    buf = SqliteBuffer(path, sync_interval=3600)
    buf.put_many([("seq", i, 1700000000000 + i, None) for i in range(n)])
    buf.close()


def _truncated(path: Path) -> None:
    _valid_buffer(path)
    size = path.stat().st_size
    os.truncate(path, size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(50_000))


def _garbage_with_sqlite_header(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(20_000))


def _wrong_schema_version(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema', '99'), ('uuid', 'x')")
    conn.commit()
    conn.close()


def _wrong_columns(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE points (a, b, c)")
    conn.commit()
    conn.close()


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "something").write_text("x")


CORRUPTIONS = {
    "truncated": _truncated,
    "garbage": _garbage,
    "garbage-with-sqlite-header": _garbage_with_sqlite_header,
    "wrong-schema-version": _wrong_schema_version,
    "wrong-columns": _wrong_columns,
    "a-directory": _directory,
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_buffer_is_moved_aside_and_a_fresh_one_starts(plexus_receiver, tmp_path, kind):
    path = tmp_path / "buf" / "b.db"
    path.parent.mkdir()
    CORRUPTIONS[kind](path)
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            for i in range(100):
                px.send("seq", i)
            px.flush_buffer(timeout=10)
    aside = sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name)
    assert aside, f"nothing moved aside: {sorted(p.name for p in path.parent.iterdir())}"
    assert aside[0].name.startswith("b.db.corrupt-2")  # b.db.corrupt-<YYYYmmddTHHMMSS>
    warnings = [line for line in logs.lines if line.startswith("WARNING")]
    assert any(str(aside[0]) in w for w in warnings), warnings
    assert sorted(values(plexus_receiver)) == list(range(100))


def test_garbage_inbox_is_discarded_with_a_warning_and_the_buffer_comes_up(plexus_receiver,
                                                                          tmp_path):
    path = tmp_path / "b.db"
    _valid_buffer(path, 10)
    # An inbox file newer than anything moved into SQLite, filled with garbage.
    Path(f"{path}.inbox.999").write_bytes(os.urandom(4096))
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            px.send("seq", 10)
            px.flush_buffer(timeout=10)
    assert "are not records" in logs.text
    assert sorted(values(plexus_receiver)) == list(range(11))


NOBODY_SCRIPT = r"""
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from plexus.sqlite_buffer import SqliteBuffer
buf = SqliteBuffer(sys.argv[1], sync_interval=3600)
buf.put(("seq", 10, 1700000000000, None))
got = []
while (batch := buf.take(100)) is not None:
    got += [p[1] for p in batch.points]
    buf.ack(batch)
# A bad database is replaced (its points are in the file set aside); a bad inbox
# file is set aside and the database's points are kept.
assert got in ([10], list(range(11))), got
buf.close()
print("CAME UP")
"""


DROP_DAC = ["--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("which", [
    "database",
    "inbox",
])
def test_unreadable_buffer_file_is_moved_aside(tmp_path, which):
    """No read/write permission on a buffer file. Root ignores permission bits, so as
    root the child process runs under util-linux ``setpriv`` without the capabilities
    that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and without setpriv permission bits cannot be "
                        "enforced on this process")
        prefix = [setpriv, *DROP_DAC]
    path = tmp_path / "b.db"
    _valid_buffer(path, 10)
    target = path if which == "database" else Path(f"{path}.inbox.999")
    target.touch()
    os.chmod(target, 0o000)
    result = subprocess.run([*prefix, sys.executable, "-c", NOBODY_SCRIPT, str(path)],
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0 and "CAME UP" in result.stdout, result.stderr[-3000:]
    marker = ".corrupt-" if which == "database" else ".unreadable-"
    aside = [p.name for p in tmp_path.iterdir() if marker in p.name]
    assert aside, sorted(p.name for p in tmp_path.iterdir())
    assert aside[0] in result.stderr, result.stderr


# --- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    if sys.platform != "linux":
        pytest.skip("tmpfs mounts are Linux only")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="plexus-full-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                             str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"mounting a tmpfs is not allowed here: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 64, 8, 1):
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_disk_full_falls_back_to_memory_and_back_to_disk(plexus_receiver, small_tmpfs):
    """Receiver down while the disk is full: points go to memory (counted in
    SqliteBuffer.spilled, one clear warning), nothing crashes; once space returns
    they go to disk again and everything is delivered."""
    path = small_tmpfs / "b.db"
    plexus_receiver.go_down()
    sent = 0
    with LogCapture() as logs:
        px = make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                         sync_interval=0.2, close_timeout=10)
        try:
            buf = px._buffer
            assert isinstance(buf, SqliteBuffer)
            for _ in range(200):
                px.send("seq", sent)
                sent += 1
            filler = fill(small_tmpfs)
            # Far more than the inbox segment made before the disk filled can hold
            # (its space was reserved when it was made), so new segments are needed.
            for _ in range(12_000):
                px.send("seq", sent)
                sent += 1
            spilled_while_full = buf.spilled
            assert spilled_while_full > 0, "nothing was kept in memory on a full disk"
            full_warnings = [line for line in logs.lines if "keeping points in memory" in line]
            assert len(full_warnings) == 1, full_warnings  # one clear warning, not one per point
            assert px.buffer_size() == sent
            filler.unlink()  # space returns
            assert wait_until(lambda: "writable again" in logs.text, timeout=10), logs.text
            for _ in range(500):
                px.send("seq", sent)
                sent += 1
            assert buf.spilled == spilled_while_full, "still spilling with space free"
            plexus_receiver.come_up()
            px.flush_buffer(timeout=30)
        finally:
            plexus_receiver.come_up()
            px.close()
    stored = values(plexus_receiver)
    assert sorted(stored) == list(range(sent))
    assert "crashed" not in logs.text, logs.text
    record_figure("disk full (receiver down meanwhile)", {
        "sent": sent, "spilled_to_memory": spilled_while_full, "delivered": len(stored),
        "lost": sent - len(set(stored))})


def test_delivery_goes_on_while_the_disk_is_full(plexus_receiver, small_tmpfs):
    path = small_tmpfs / "b.db"
    sent = 0
    with LogCapture() as logs:
        px = make_client(plexus_receiver, persistent_buffer=True, buffer_path=path,
                         sync_interval=0.2, close_timeout=1)
        try:
            for _ in range(200):
                px.send("seq", sent)
                sent += 1
            px.flush_buffer(timeout=10)
            filler = fill(small_tmpfs)
            for _ in range(12_000):  # more than the inbox segment made before can hold
                px.send("seq", sent)
                sent += 1
            assert px._buffer.spilled > 0
            # Everything is delivered while the disk stays full: the points kept only in
            # memory, and those in the inbox that SQLite has no room to take.
            assert wait_until(lambda: len(values(plexus_receiver)) == sent, timeout=20)
            assert sorted(values(plexus_receiver)) == list(range(sent))
            filler.unlink()
            px.flush_buffer(timeout=10)
            assert sorted(values(plexus_receiver)) == list(range(sent))
        finally:
            px.close()
    assert "crashed" not in logs.text


def test_a_buffer_of_the_previous_version_is_converted_and_delivered(plexus_receiver,
                                                                     tmp_path):
    """Schema 2 (the released version): one SQLite row per point (the JSON of its
    tuple) and an inbox of (length, CRC32, payload) records past the recorded
    position, with the batch in flight recorded by row ids."""
    import struct
    import zlib

    import orjson

    path = tmp_path / "b.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("CREATE TABLE points (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL)")
    conn.executemany("INSERT INTO points (data) VALUES (?)",
                     [(orjson.dumps(("seq", i, 1700000000000 + i, None)),) for i in range(30)])
    conn.execute("INSERT INTO meta VALUES ('schema', '2'), ('uuid', 'abc'), ('inbox_gen', '3'), "
                 "('inbox_offset', '0'), ('in_flight', '1-10')")
    conn.commit()
    conn.close()
    records = b""
    for i in range(30, 40):
        data = orjson.dumps(("seq", i, 1700000000000 + i, {"rig": "A"}))
        records += struct.pack("<II", len(data), zlib.crc32(data)) + data
    Path(f"{path}.inbox.3").write_bytes(records + bytes(8))  # and a zero tail
    with LogCapture() as logs:
        with make_client(plexus_receiver, persistent_buffer=True, buffer_path=path) as px:
            assert px.buffer_size() == 40
            px.flush_buffer(timeout=10)
    assert sorted(values(plexus_receiver)) == list(range(40))
    assert [p["tags"] for p in plexus_receiver.points if p["value"] == 35] == [{"rig": "A"}]
    assert "converted the buffer" in logs.text
    assert "could not be used" not in logs.text
