"""Real power cuts of the persistent buffer, on an ext4 disk behind a loop device.

A writer process sends 0, 1, 2... through ``Plexus(persistent_buffer=True)``
at a steady rate to a platform that cannot be reached, so everything waits
in the buffer. At a cut instant it is stopped (SIGSTOP) and the disk's
backing file is copied: what the loop device received is on the copy, what
sat only in the page cache is gone, as after a real power cut. The copy then
goes through the next boot: ``e2fsck -fy``, a mount, and a fresh
``Plexus(persistent_buffer=True)`` pointed at a working receiver, which must
deliver everything the buffer holds.

Cut instants are of two kinds:

- random: the test stops the writer at a random moment;
- targeted: the writer stops itself inside a move of the inbox into SQLite
  (rows written, transaction not committed), just before and just after a
  WAL checkpoint, and inside the switch to a new inbox file. Each targeted
  stop is cut twice: as the disk holds it (only what was synced), and after
  a ``syncfs`` (every write made so far reached the disk, committed or not).

For every image: it opens (nothing moved aside), what it delivers is exactly
the prefix 0..k-1 of the sequence, nothing twice, and k is at least the
number of points acknowledged before the last completed sync began: the loss
is at most ``sync_interval`` plus the sync's own duration.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from plexus.testing import Receiver
from tests.reliability.conftest import record_figure
from tests.reliability.loopdisk import LoopDisk, Recovered, unavailable
from tests.reliability.support import LogCapture, child_env, make_client, values

RATE = 20_000  # points per second, as in the report that found the wedge
SYNC_INTERVAL = 1.0

WRITER = r"""
import os, signal, sys, time
import plexus.sqlite_buffer as sb
from plexus import Plexus, RetryPolicy

url, path, rate, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
acked = 0
seen = {}

def say(line):
    os.write(1, line.encode() + b"\n")

armed = False

def phase(name):
    # The test asks for a stop at the n-th time a phase is reached: "move:3".
    if not armed:
        return  # opening the buffer moves and rotates too; cut only the running one
    seen[name] = seen.get(name, 0) + 1
    if stop_at == f"{name}:{seen[name]}":
        say(f"C {name} {acked}")
        os.kill(os.getpid(), signal.SIGSTOP)

class Traced(sb.SqliteBuffer):
    def sync(self):
        before, t0 = acked, time.monotonic()
        super().sync()
        say(f"S {before} {time.monotonic() - t0:.4f}")

    def _set_position(self, gen, offset):  # inside a move's transaction, before COMMIT
        super()._set_position(gen, offset)
        phase("move")

    def _switch_segment(self):  # a producer sealed a segment and began the next
        seg = super()._switch_segment()
        phase("rotate")
        return seg

    def _trim(self):  # the WAL checkpoint of a sync round comes next
        super()._trim()
        phase("checkpoint-before")

    def _delete_retired(self):  # ...and this right after it
        phase("checkpoint-after")
        super()._delete_retired()

sb.SqliteBuffer = Traced
px = Plexus(api_key="plx_test", source_id="rig-01", gateway_url=url, persistent_buffer=True,
            buffer_path=path, sync_interval=float(os.environ["SYNC_INTERVAL"]),
            retry=RetryPolicy(retries=1, base=0.05, max_delay=0.2), timeout=0.5)
armed = True
say("READY")
start = time.perf_counter()
i = 0
while True:
    due = int((time.perf_counter() - start) * rate)
    if i >= due:
        time.sleep(0.0005)
        continue
    for _ in range(min(due - i, 200)):
        px.send("seq", i)
        i += 1
    acked = i
    say(f"P {i}")
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Writer:
    """The writer process, with what it has said so far."""

    def __init__(self, disk: LoopDisk, stop_at: str = "-") -> None:
        self.db = disk.path / "buffer" / "rig-01.db"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, f"http://127.0.0.1:{_closed_port()}", str(self.db),
             str(RATE), stop_at],
            stdout=subprocess.PIPE, env=child_env(SYNC_INTERVAL=str(SYNC_INTERVAL)))
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.rest = b""
        self.acked = 0  # send() calls returned
        self.durable = 0  # returned before the last completed sync began
        self.sync_seconds = 0.0  # the longest sync seen
        self.ready = False
        self.stopped_in: str | None = None

    def read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            *lines, self.rest = (self.rest + data).split(b"\n")
            for line in lines:
                kind, _, rest = line.decode().partition(" ")
                if kind == "P":
                    self.acked = int(rest)
                elif kind == "S":
                    before, seconds = rest.split()
                    self.durable = max(self.durable, int(before))
                    self.sync_seconds = max(self.sync_seconds, float(seconds))
                elif kind == "C":
                    self.stopped_in = rest.split()[0]
                elif kind == "READY":
                    self.ready = True

    def wait(self, predicate: Callable[[Writer], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            if predicate(self):
                return True
            assert self.proc.poll() is None, "the writer died"
            time.sleep(0.002)
        return False

    def is_stopped(self) -> bool:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        while not self.is_stopped():
            time.sleep(0.0005)
        self.read()

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def drain_image(image: Path, rx: Receiver) -> tuple[list[int], str, bool]:
    """Boot a cut image and deliver its buffer; return (values delivered, log, fsck fixed)."""
    rx.clear()
    with Recovered(image) as disk, LogCapture() as logs:
        db = disk.path / "buffer" / "rig-01.db"
        with make_client(rx, persistent_buffer=True, buffer_path=db) as px:
            held = px.buffer_size()
            px.flush_buffer(timeout=120)
        delivered = values(rx, "seq")
        assert len(delivered) == held, f"held {held}, delivered {len(delivered)}"
        aside = [p.name for p in db.parent.iterdir() if ".corrupt-" in p.name
                 or ".unreadable-" in p.name]
    assert not aside, f"buffer files moved aside after the cut: {aside}\n{logs.text}"
    return delivered, logs.text, disk.fsck_fixed


def check_cut(delivered: list[int], acked: int, durable: int, what: str) -> int:
    k = len(delivered)
    assert len(set(delivered)) == k, f"{what}: {k - len(set(delivered))} points delivered twice"
    assert set(delivered) == set(range(k)), (
        f"{what}: not a prefix of the sequence (first hole at "
        f"{min(set(range(max(delivered, default=0) + 1)) - set(delivered))})")
    assert k <= acked + 200, f"{what}: delivered {k}, only {acked} were sent"
    assert k >= durable, (f"{what}: delivered {k} points, but {durable} were acknowledged "
                          "before the last completed sync began")
    return k


@pytest.fixture(scope="module")
def loop_devices() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(f"power-cut trials skipped: {reason}")


TARGETS = ["move:2", "rotate:2", "checkpoint-before:2", "checkpoint-after:1", "move:4"]


def test_power_cut_at_random_instants(loop_devices, slow):
    cuts = 30 if slow else 10
    rng = random.Random(9)
    rows = []
    with Receiver(api_keys=("plx_test",)) as rx:
        for n in range(cuts):
            with LoopDisk() as disk:
                writer = Writer(disk)
                try:
                    assert writer.wait(lambda w: w.ready and w.acked > 0, 30)
                    writer.wait(lambda w: False, rng.uniform(0.3, 3.2))
                    writer.stop()
                    image = disk.cut()
                    acked, durable = writer.acked, writer.durable
                    sync_s = writer.sync_seconds
                finally:
                    writer.kill()
                delivered, _, fixed = drain_image(image, rx)
            k = check_cut(delivered, acked, durable, f"random cut {n}")
            rows.append({"acked": acked, "held": k, "lost_s": max(0, acked - k) / RATE,
                         "sync_s": sync_s, "fsck_fixed": fixed})
    record_power_cut_figures("random instants", rows)


def test_power_cut_inside_moves_and_checkpoints(loop_devices):
    rows = []
    with Receiver(api_keys=("plx_test",)) as rx:
        for target in TARGETS:
            for flushed in (False, True):
                with LoopDisk() as disk:
                    writer = Writer(disk, stop_at=target)
                    try:
                        assert writer.wait(lambda w: w.stopped_in is not None
                                           and w.is_stopped(), 30), f"never reached {target}"
                        writer.read()
                        if flushed:
                            disk.flush_page_cache()
                        image = disk.cut()
                        acked, durable = writer.acked, writer.durable
                    finally:
                        writer.kill()
                    delivered, _, fixed = drain_image(image, rx)
                what = f"cut in {target}{' after syncfs' if flushed else ''}"
                k = check_cut(delivered, acked, durable, what)
                if flushed:  # every write reached the disk: nothing acknowledged is lost
                    assert k >= acked, f"{what}: {acked - k} acknowledged points lost"
                rows.append({"acked": acked, "held": k, "lost_s": max(0, acked - k) / RATE,
                             "sync_s": 0.0, "fsck_fixed": fixed})
    record_power_cut_figures("inside moves, rotations and checkpoints", rows)


def record_power_cut_figures(kind: str, rows: list[dict[str, float]]) -> None:
    lost = [r["lost_s"] for r in rows]
    record_figure(f"power cut ({kind})", {
        "cuts": len(rows), "points acknowledged": sum(int(r["acked"]) for r in rows),
        "points delivered": sum(int(r["held"]) for r in rows),
        "loss window s (min/median/max)":
            f"{min(lost):.3f}/{sorted(lost)[len(lost) // 2]:.3f}/{max(lost):.3f}",
        "longest sync s": max(r["sync_s"] for r in rows),
        "images e2fsck repaired": sum(1 for r in rows if r["fsck_fixed"])})
