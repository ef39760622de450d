"""Crashes and power loss with the persistent buffer.

``kill -9``: a writer process sends a numbered sequence through ``Plexus`` with
``persistent_buffer=True`` and prints each index once ``send()`` returned; it
is killed with SIGKILL at a random moment (twice per trial, the second run on
the first one's buffer), then a client on the same buffer delivers what is
left. Every printed index must arrive, nothing may be invented, and the buffer
must open cleanly (no file moved aside, no torn record).

Power loss: a writer process puts a numbered sequence into a ``SqliteBuffer``;
at random instants it is frozen with SIGSTOP, its files are copied (a
point-in-time image, as a hard reset would leave the page cache if all of it
had reached the disk), and it is resumed with SIGCONT. Each image is opened
with a new ``SqliteBuffer`` as is, with the inbox cut at a random byte after
the position SQLite recorded (a torn last write), and with the ``-wal`` file
removed (a WAL never synced since the last checkpoint). What each holds must
be exactly the prefix 0..k-1 of the sequence, k at least the points put before
the last sync that completed.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plexus import PlexusError
from plexus.sqlite_buffer import SqliteBuffer
from plexus.testing import Receiver
from tests.reliability.conftest import record_figure
from tests.reliability.support import LogCapture, child_env, make_client, values

KILL_WRITER = r"""
import os, sys
from plexus import Plexus, RetryPolicy
url, path, sync_interval, run = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
px = Plexus(api_key="plx_test", source_id="rig-01", gateway_url=url, persistent_buffer=True,
            buffer_path=path, flush_interval=0.01, batch_size=50, sync_interval=sync_interval,
            retry=RetryPolicy(retries=1, base=0.01, max_delay=0.02))
i = run * 1_000_000
while True:
    px.send("seq", i)
    os.write(1, b"%d\n" % i)
    i += 1
"""


def run_and_kill(url: str, path: Path, sync_interval: float, run: int, rng: random.Random,
                 ) -> list[int]:
    """Start a writer, SIGKILL it at a random moment; return the indices it acknowledged."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, url, str(path),
                             str(sync_interval), str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
    assert proc.stdout is not None
    chunks: list[bytes] = []
    first = threading.Event()

    def read() -> None:
        while True:
            data = proc.stdout.read1(65536)  # type: ignore[union-attr]
            if not data:
                return
            chunks.append(data)
            first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(30), "the writer never started"
    time.sleep(rng.uniform(0.02, 0.35))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(10)
    text = b"".join(chunks).decode()
    lines = text.split("\n")
    return [int(x) for x in lines[:-1]]  # the last piece may be a half-written line


KILL_VARIANTS = {
    # receiver down: everything waits in the buffer when the kill comes
    "receiver-down": {"down": True, "sync_interval": 1.0},
    # receiver up: requests and acknowledgements in flight when the kill comes
    "receiver-up": {"down": False, "sync_interval": 1.0},
    # the sync thread moving the inbox into SQLite and truncating it all the time
    "fast-sync": {"down": False, "sync_interval": 0.01},
    "fast-sync-down": {"down": True, "sync_interval": 0.01},
}


def kill_trial(variant: str, trial: int, base: Path, kills: int) -> dict[str, int]:
    cfg = KILL_VARIANTS[variant]
    rng = random.Random(f"{variant}-{trial}")
    path = base / f"{variant}-{trial}" / "buffer.db"
    path.parent.mkdir(parents=True)
    with Receiver(api_keys=("plx_test",)) as rx, LogCapture() as logs:
        if cfg["down"]:
            rx.go_down()
        acknowledged: list[int] = []
        highest: dict[int, int] = {}
        for run in range(kills):
            acked = run_and_kill(rx.url, path, cfg["sync_interval"], run, rng)
            acknowledged += acked
            highest[run] = max(acked, default=run * 1_000_000 - 1)
        rx.come_up()
        with make_client(rx, persistent_buffer=True, buffer_path=path) as px:
            px.flush_buffer(timeout=60)
        stored = values(rx, "seq")
    delivered = set(stored)
    missing = set(acknowledged) - delivered
    assert not missing, f"{variant} trial {trial}: lost {len(missing)} acknowledged points"
    for v in delivered:  # nothing invented: at most the one send() in progress per run
        run = v // 1_000_000
        assert run in highest and v <= highest[run] + 1, v
    aside = [p.name for p in path.parent.iterdir() if ".corrupt-" in p.name]
    assert not aside, f"buffer moved aside after kill -9: {aside}"
    # A kill in the middle of a write() can leave the first part of that record on disk
    # (Linux stops a write between pages for a fatal signal). That send() had not
    # returned; the CRC framing discards the piece at the next open, and nothing
    # acknowledged is lost (checked above).
    assert "could not be used" not in logs.text, logs.text
    return {"kills": kills, "acknowledged": len(acknowledged), "stored": len(stored),
            "duplicates_stored": len(stored) - len(delivered),
            "unacknowledged_delivered": len(delivered - set(acknowledged))}


def test_kill_9_at_random_moments_loses_nothing(tmp_path, slow):
    trials_per_variant = 25 if slow else 5  # x 4 variants
    jobs = [(v, t) for t in range(trials_per_variant) for v in KILL_VARIANTS]
    results: dict[str, list[dict[str, int]]] = {v: [] for v in KILL_VARIANTS}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Each trial kills 1 or 2 writers in a row on the same buffer (2 with --slow).
        futures = {pool.submit(kill_trial, v, t, tmp_path, 2 if slow else 1 + t % 2): v
                   for v, t in jobs}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]].append(future.result())
    for variant, rows in results.items():
        record_figure(f"kill -9 {variant}", {
            "trials": len(rows), "kills": sum(r["kills"] for r in rows),
            "acknowledged": sum(r["acknowledged"] for r in rows),
            "lost": 0,
            "duplicates_stored": sum(r["duplicates_stored"] for r in rows),
            "unacknowledged_but_delivered": sum(r["unacknowledged_delivered"] for r in rows)})
    down = results["receiver-down"] + results["fast-sync-down"]
    assert all(r["duplicates_stored"] == 0 for r in down)  # nothing was ever in flight


def restart_with_a_batch_of_unknown_outcome(plexus_receiver_factory, tmp_path) -> list[int]:
    """The batch in flight when the process stops is sent again after the restart;
    returns what the receiver stored."""
    rx = plexus_receiver_factory()
    path = tmp_path / "b.db"
    rx.delay_next(1, 1.0)  # stored after 1 s; the client gives up after 0.2 s
    px = make_client(rx, persistent_buffer=True, buffer_path=path, timeout=0.2,
                     flush_interval=60, retry=None)
    px._uploader.retry = type(px._uploader.retry)(retries=0, base=0.01, max_delay=0.05)
    for i in range(5):
        px.send("seq", i)
    with pytest.raises(PlexusError):
        px.flush_buffer(timeout=5)
    px.close(timeout=0)  # the batch goes back to the buffer, unacknowledged
    assert rx.wait_for(5, timeout=10)  # ...but the receiver did store it
    with make_client(rx, persistent_buffer=True, buffer_path=path, flush_interval=60) as px2:
        for i in range(5, 10):
            px2.send("seq", i)
        px2.flush_buffer(timeout=10)
    stored = values(rx)
    assert set(stored) == set(range(10))  # nothing lost either way
    return stored


def test_restart_after_an_unknown_outcome_loses_nothing(plexus_receiver_factory, tmp_path):
    restart_with_a_batch_of_unknown_outcome(plexus_receiver_factory, tmp_path)


def test_restart_keeps_the_idempotency_key_of_the_batch_in_flight(plexus_receiver_factory,
                                                                   tmp_path):
    stored = restart_with_a_batch_of_unknown_outcome(plexus_receiver_factory, tmp_path)
    assert sorted(stored) == list(range(10)), f"stored twice: {sorted(stored)}"


# --- power loss -----------------------------------------------------------------------------

POWER_WRITER = r"""
import os, sys, time
from plexus.sqlite_buffer import SqliteBuffer
path, sync_interval = sys.argv[1], float(sys.argv[2])
returned = 0

class Traced(SqliteBuffer):
    # S n: a sync completed that began after n puts had returned.
    # K1/K0: a WAL checkpoint is running / over (an image taken meanwhile has a WAL that
    # was fsynced before the checkpoint began, so "WAL lost" is not a state it can be in).
    def sync(self):
        before = returned
        super().sync()
        os.write(1, b"S %d\n" % before)

    def _trim(self):
        super()._trim()
        os.write(1, b"K1\n")

    def _delete_retired(self):  # runs right after the checkpoint of a sync round
        os.write(1, b"K0\n")
        super()._delete_retired()

buf = Traced(path, sync_interval=sync_interval)
os.write(1, b"READY\n")
i = 0
while True:
    buf.put(("seq", i, 1700000000000 + i, None))
    returned = i + 1
    os.write(1, b"P %d\n" % i)
    i += 1
    if i % 100 == 0:
        time.sleep(0.002)  # bursts, at most ~50,000 points/s: images stay quick to open
"""


class FrozenWriter:
    """A POWER_WRITER process whose output is read without blocking."""

    def __init__(self, path: Path, sync_interval: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", POWER_WRITER, str(path),
                                      str(sync_interval)], stdout=subprocess.PIPE,
                                     env=child_env())
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.rest = b""
        self.acked = 0  # puts returned
        self.durable = 0  # puts returned before the last completed sync began
        self.checkpointing = False
        self.ready = False

    def drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            lines = (self.rest + data).split(b"\n")
            self.rest = lines.pop()
            for line in lines:
                if line.startswith(b"P "):
                    self.acked = int(line[2:]) + 1
                elif line.startswith(b"S "):
                    self.durable = max(self.durable, int(line[2:]))
                elif line == b"K1":
                    self.checkpointing = True
                elif line == b"K0":
                    self.checkpointing = False
                elif line == b"READY":
                    self.ready = True

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain()
            time.sleep(0.002)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            time.sleep(0.001)
        self.drain()

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def inbox_files(db: Path) -> list[Path]:
    """The numbered inbox files of a buffer, oldest generation first."""
    prefix = f"{db.name}.inbox."
    return sorted((f for f in db.parent.glob(prefix + "*") if f.name[len(prefix):].isdigit()),
                  key=lambda f: int(f.name[len(prefix):]))


def copy_image(src: Path, dst_dir: Path, with_wal: bool = True) -> Path:
    dst_dir.mkdir(parents=True)
    files = [Path(f"{src}{suffix}") for suffix in ("",) + (("-wal",) if with_wal else ())]
    for f in [*files, *inbox_files(src)]:
        if f.exists():
            shutil.copyfile(f, dst_dir / f.name)
    return dst_dir / src.name


def recorded_inbox_position(image: Path) -> tuple[int, int]:
    scratch = image.parent / "scratch"
    copy = copy_image(image, scratch)
    conn = sqlite3.connect(copy)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    shutil.rmtree(scratch)
    return int(meta.get("inbox_gen", 0)), int(meta.get("inbox_offset", 0))


def open_image(image: Path) -> tuple[list[int], str]:
    with LogCapture() as logs:
        buf = SqliteBuffer(image, sync_interval=3600)
        try:
            total = len(buf)
            held = []
            while (batch := buf.take(10**8)) is not None:
                held += [p[1] for p in batch.points]
                buf.ack(batch)
            assert total == len(held)
        finally:
            buf.close()
    return held, logs.text


def check_prefix(held: list[int], at_least: int, what: str) -> int:
    k = len(held)
    assert held == list(range(k)), (
        f"{what}: not a prefix of the sequence (first hole at "
        f"{next(i for i, v in enumerate(held) if v != i)}, {k} points held)")
    assert k >= at_least, f"{what}: holds {k} points, at least {at_least} were durable"
    return k


def power_loss_images(base: Path, sync_interval: float, snapshots: int, rng: random.Random):
    """Yield (image dir, acked, durable, checkpointing) snapshots of one writer."""
    path = base / "live" / "buffer.db"
    path.parent.mkdir(parents=True)
    writer = FrozenWriter(path, sync_interval)
    try:
        while not writer.ready:
            writer.run_for(0.01)
            assert writer.proc.poll() is None, "the writer died"
        for n in range(snapshots):
            writer.run_for(rng.uniform(0.02, 0.4))
            writer.freeze()
            image = copy_image(path, base / f"image-{n}")
            acked, durable, busy = writer.acked, writer.durable, writer.checkpointing
            writer.thaw()
            yield image, acked, durable, busy
    finally:
        writer.stop()


def power_loss_run(base: Path, sync_interval: float, snapshots: int, seed: int,
                   ) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for image, acked, durable, busy in power_loss_images(base, sync_interval, snapshots, rng):
        row: dict[str, object] = {"acked": acked, "durable": durable}
        held, log_text = open_image(copy_image(image, image.parent / "exact"))
        # A point-in-time image is what kill -9 leaves: nothing acknowledged is lost.
        row["exact"] = check_prefix(held, acked, f"exact image (sync {sync_interval})")
        assert len(held) <= acked + 1, "holds a point never put"
        assert "could not be used" not in log_text, log_text

        torn = copy_image(image, image.parent / "torn")
        # The last write torn: cut the newest inbox file somewhere past what SQLite has.
        newest = inbox_files(torn)[-1:] or [None]
        inbox = newest[0]
        if inbox is not None:
            size = inbox.stat().st_size
            gen, offset = recorded_inbox_position(torn)
            start = min(offset, size) if inbox.name.endswith(f".inbox.{gen}") else 0
            if size > start:
                os.truncate(inbox, rng.randint(start, size - 1))
        held, log_text = open_image(torn)
        row["torn"] = check_prefix(held, durable, f"torn inbox (sync {sync_interval})")
        assert "could not be used" not in log_text, log_text

        if not busy:  # mid-checkpoint the WAL had been fsynced: it cannot be missing
            held, log_text = open_image(copy_image(image, image.parent / "nowal",
                                                   with_wal=False))
            assert "could not be used" not in log_text, log_text
            row["no_wal"] = check_prefix(held, durable, f"WAL lost (sync {sync_interval})")
        rows.append(row)
        shutil.rmtree(image.parent / "exact")
        shutil.rmtree(image.parent / "torn")
        shutil.rmtree(image.parent / "nowal", ignore_errors=True)
    return rows


def test_power_loss_images_hold_a_prefix(tmp_path, slow):
    intervals = [0.01, 0.05, 0.2, 1.0]
    per_writer = 20 if slow else 4
    rows: list[dict[str, object]] = []
    for n, interval in enumerate(intervals):
        rows += power_loss_run(tmp_path / f"w{n}", interval, per_writer, seed=n)
    window = [int(r["acked"]) - int(r["durable"]) for r in rows]  # type: ignore[call-overload]
    torn_lost = [int(r["acked"]) - int(r["torn"]) for r in rows]  # type: ignore[call-overload]
    no_wal = [r for r in rows if "no_wal" in r]
    record_figure("power loss", {
        "images": len(rows), "sync_intervals_s": intervals,
        "exact images: points lost": 0,
        "max points put after the last completed sync": max(window),
        "torn inbox: max points lost": max(torn_lost),
        "wal lost: images": len(no_wal),
        "wal lost: max points lost": max((int(r["acked"]) - int(r["no_wal"])  # type: ignore
                                          for r in no_wal), default=0)})


def test_power_loss_with_the_wal_lost_holds_a_prefix(tmp_path):
    """Deterministic form of the WAL-lost image: one sync that moves and rotates the inbox,
    more records of the same size, then the files as a power cut before the next
    checkpoint leaves them (db and inbox files on disk, the WAL not)."""
    live = tmp_path / "live" / "b.db"
    buf = SqliteBuffer(live, sync_interval=3600)

    def point(i: int):  # every record the same size, as a steady sensor stream makes them
        return ("s" + "x" * (4 - len(str(i))), i, 1700000000000 + i, None)

    try:
        for i in range(100):
            buf.put(point(i))
        buf.sync()  # moved, checkpointed, a new inbox file begun; that only in the WAL
        for i in range(100, 400):
            buf.put(point(i))
        image = copy_image(live, tmp_path / "image", with_wal=False)
    finally:
        buf.close()
    held, _ = open_image(image)
    check_prefix(held, 100, "WAL lost after a truncation")
