"""Measurements of this project's client, one mode per subprocess.

    python bench/ours_worker.py '{"mode": "send_cost", ...}'

Prints one JSON line with the result. Run by bench/run.py; see there.
"""

from __future__ import annotations

import json
import sys
import time

from common import cpu_seconds, peak_rss_kb

T_START = time.perf_counter()



def current_rss_kb() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def make_client(args: dict, **overrides):
    import logging

    from plexus import Plexus

    logging.basicConfig(level=logging.ERROR)
    opts = dict(api_key="plx_test", source_id="bench-ours", gateway_url=args["url"])
    if args.get("buffer") == "persistent":
        opts["persistent_buffer"] = True
        opts["buffer_path"] = f"{args['tmp']}/buffer.db"
    opts.update(overrides)
    return Plexus(**opts)


def metric_names(k: int) -> list[str]:
    """``k`` distinct metric names (the first ten are the usual stream's)."""
    from common import METRICS

    return METRICS[:k] if k <= 10 else [f"rig.sensor_{i}" for i in range(k)]


def tag_dicts(k: int) -> list[dict[str, str] | None]:
    """A few tag dicts of ``k`` tags each (built before the clock), or None for 0."""
    if k == 0:
        return [None]
    return [{f"tag{j}": f"value{(j + d) % 7}" for j in range(k)} for d in range(8)]


def mode_send_cost(args: dict) -> dict:
    """µs per send() with the uploader idle (no batch is due during the loop).

    ``metrics``: distinct metric names cycled through; ``tags``: tags per call;
    ``threads``: producer threads sharing the client.
    """
    import threading

    sys.path.insert(0, args["bench"])
    from common import values_table

    n, repeats, threads = args["n"], args["repeats"], args["threads"]
    names = metric_names(args.get("metrics", 10))
    tagsets = tag_dicts(args.get("tags", 0))
    values = values_table()
    nv, nn, nt = len(values), len(names), len(tagsets)
    # The uploader stays idle (no batch due, a cap that holds every call), so the
    # loop measures send() alone; nothing is delivered.
    px = make_client(args, batch_size=10**9, flush_interval=3600.0,
                     max_buffer_points=(n + 10_000) * (repeats + 1))
    send = px.send

    if nt == 1 and tagsets[0] is None:
        def loop(count: int, offset: int) -> None:
            for i in range(offset, offset + count):
                send(names[i % nn], values[i % nv])
    else:
        def loop(count: int, offset: int) -> None:
            for i in range(offset, offset + count):
                send(names[i % nn], values[i % nv], None, tagsets[i % nt])

    loop(10_000, 0)  # warm-up

    def bare(count: int) -> None:  # the loop's own cost: indexing, no call
        for i in range(count):
            names[i % nn], values[i % nv], tagsets[i % nt]

    t0 = time.perf_counter_ns()
    bare(n)
    loop_us = (time.perf_counter_ns() - t0) / n / 1000
    wall, cpu = [], []
    for _ in range(repeats):
        if threads == 1:
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            loop(n, 0)
            t1 = time.perf_counter_ns()
            cpu.append((time.thread_time_ns() - c0) / n / 1000)
        else:
            per = n // threads
            workers = [threading.Thread(target=loop, args=(per, k * per)) for k in range(threads)]
            t0 = time.perf_counter_ns()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            t1 = time.perf_counter_ns()
        wall.append((t1 - t0) / n / 1000)
    px.close(timeout=0)
    return {"wall_us": wall, "cpu_us": cpu, "loop_us": loop_us}


def mode_throughput(args: dict) -> dict:
    """Send n points as fast as possible at default settings; close() delivers them all.

    A persistent buffer may already hold a backlog (``mode_populate``): it is
    delivered too, and the receiver counts it.
    """
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    n = args["n"]
    values = values_table()
    nv = len(values)
    t_open = time.perf_counter()
    px = make_client(args)
    open_s = time.perf_counter() - t_open
    backlog = px.buffer_size()
    send = px.send
    metrics = METRICS
    c0 = cpu_seconds()
    t0 = time.time()
    for i in range(n):
        send(metrics[i % 10], values[i % nv])
    t_sent = time.time()
    px.close(timeout=600)
    t1 = time.time()
    c1 = cpu_seconds()
    return {"t0": t0, "t_sent": t_sent, "t_closed": t1, "cpu": c1 - c0, "sent": n,
            "backlog": backlog, "open_s": open_s, "left": px.buffer_size(),
            "delivered_sender": px.stats.delivered, "dropped": px.dropped,
            "waited": getattr(px._buffer, "waited", 0), "peak_rss_kb": peak_rss_kb()}


def mode_defaults(args: dict) -> dict:
    """A burst of n points with every setting at its default, then close()."""
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    px = make_client(args)
    send = px.send
    t0 = time.time()
    for i in range(args["n"]):
        send(METRICS[i % 10], values[i % nv])
    t_sent = time.time()
    px.close()  # the default close timeout
    return {"t0": t0, "t_sent": t_sent, "t_closed": time.time(), "dropped": px.dropped,
            "left": px.buffer_size(), "peak_rss_kb": peak_rss_kb()}


def mode_populate(args: dict) -> dict:
    """A persistent buffer file holding ``points`` points, made fast: one real block
    (10,000 points of the usual stream, stored by SqliteBuffer itself with the
    Plexus sink's codec) copied row by row in SQL. Every copy gets its own id, so
    its own batch key: the receiver stores each copy."""
    import sqlite3

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    from plexus.codec import IngestCodec
    from plexus.sqlite_buffer import BLOCK_POINTS, SqliteBuffer

    values = values_table()
    nv = len(values)
    path = args["path"]
    buf = SqliteBuffer(path)
    buf.set_codec(IngestCodec(args.get("source_id", "bench-ours")))
    ts = int(time.time() * 1000)
    for i in range(BLOCK_POINTS):
        buf.put((METRICS[i % 10], values[i % nv], ts + i, None))
    buf.close()
    conn = sqlite3.connect(path)
    row = conn.execute("SELECT count, raw_bytes, codec, crc, data FROM blocks").fetchall()
    assert len(row) == 1 and row[0][0] == BLOCK_POINTS, [r[:4] for r in row]
    copies = args["points"] // BLOCK_POINTS
    with conn:
        conn.execute("DELETE FROM blocks")
        chunk = 500
        for start in range(0, copies, chunk):
            conn.executemany("INSERT INTO blocks (count, raw_bytes, codec, crc, data) "
                             "VALUES (?, ?, ?, ?, ?)", [row[0]] * min(chunk, copies - start))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"points": copies * BLOCK_POINTS, "block_bytes": len(row[0][4]),
            "file_bytes": _files_bytes(path)}


def _files_bytes(path: str) -> int:
    """The buffer's bytes on disk: the database, its WAL and its inbox segments."""
    import glob
    import os

    return sum(os.path.getsize(p) for p in glob.glob(f"{glob.escape(path)}*")
               if os.path.isfile(p) and not p.endswith(".lock"))


def mode_disk_bytes(args: dict) -> dict:
    """n points of the usual stream into a persistent buffer whose platform is away
    (nothing leaves); after close() (a sync) the files' bytes ÷ points held."""
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n = args["n"]
    px = make_client(args, flush_interval=3600.0, batch_size=10**9)
    send = px.send
    for i in range(n):
        send(METRICS[i % 10], values[i % nv])
    px.close(timeout=0)
    import glob
    import os

    path = f"{args['tmp']}/buffer.db"
    # Measured before buffer_stats opens the database (which makes -wal/-shm files).
    files = {os.path.basename(p): os.path.getsize(p) for p in glob.glob(f"{glob.escape(path)}*")
             if os.path.isfile(p) and not p.endswith(".lock")}
    from plexus.sqlite_buffer import buffer_stats

    held = buffer_stats(path).get("points", 0)
    return {"files": files, "bytes": sum(files.values()), "held": held, "sent": n}


def rss_parts_kb() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process: the heap, and mapped file pages (the inbox)."""
    anon = file = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("RssFile:"):
                file = int(line.split()[1])
    return anon, file


def mode_rss_backlog(args: dict) -> dict:
    """Open a client on a persistent buffer already holding a backlog and send a
    steady ``rate`` points/s for ``seconds`` while the uploader delivers the backlog
    at full speed (a vehicle back in coverage after an outage), then close(timeout=0).
    RSS (and its anonymous and file-mapped parts) sampled every 0.1 s."""
    import threading

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    rss_start = current_rss_kb()
    t_open = time.perf_counter()
    px = make_client(args)
    open_s = time.perf_counter() - t_open
    rss_open = current_rss_kb()
    backlog = px.buffer_size()
    samples: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            samples.append((current_rss_kb(), *rss_parts_kb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    send = px.send
    rate, seconds = args["rate"], args["seconds"]
    start = time.monotonic()
    i = 0
    while i < rate * seconds:
        for _ in range(100):
            send(METRICS[i % 10], values[i % nv])
            i += 1
        pause = start + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    stop.set()
    sampler.join()
    delivered = px.stats.delivered
    px.close(timeout=0)
    return {"backlog": backlog, "open_s": open_s, "rss_start_kb": rss_start,
            "rss_open_kb": rss_open, "samples_kb": [s[0] for s in samples],
            "anon_kb": [s[1] for s in samples], "file_kb": [s[2] for s in samples],
            "sent": i, "delivered_sender": delivered, "peak_rss_kb": peak_rss_kb()}


def mode_burst(args: dict) -> dict:
    """A burst of n points as fast as possible; peak RSS (``max_points``: buffer cap)."""
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    overrides = {"max_buffer_points": args["max_points"]} if args.get("max_points") else {}
    px = make_client(args, **overrides)
    send = px.send
    n = args["n"]
    for i in range(n):
        send(METRICS[i % 10], values[i % nv])
    px.close(timeout=120)
    return {"peak_rss_kb": peak_rss_kb(), "dropped": px.dropped,
            "delivered_sender": px.stats.delivered}


def mode_memory(args: dict) -> dict:
    """n points buffered (nothing is uploaded: no batch is due); peak RSS."""
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n = args["n"]
    px = make_client(args, batch_size=10**9, flush_interval=3600.0,
                     max_buffer_points=max(n, 10))
    send = px.send
    samples = []
    step = max(1, n // 10)
    for i in range(n):
        send(METRICS[i % 10], values[i % nv])
        if (i + 1) % step == 0:
            samples.append((i + 1, current_rss_kb(), *rss_parts_kb()))
    buffered = px.buffer_size()
    if args.get("buffer") == "persistent":
        time.sleep(1.5)  # let the sync thread move the inbox into SQLite once
        samples.append((n, current_rss_kb(), *rss_parts_kb()))
    peak = peak_rss_kb()
    px.close(timeout=0)
    return {"peak_rss_kb": peak, "buffered": buffered, "samples": samples}


def mode_sqlite_io(args: dict) -> dict:
    """SqliteBuffer alone with the shipped settings: a producer thread puts n
    points while the consumer takes/acks batches of 10,000 (the uploader's
    max_batch), as the uploader does."""
    import threading

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    from plexus.sqlite_buffer import SqliteBuffer

    values = values_table()
    nv = len(values)
    n = args["n"]
    buf = SqliteBuffer(f"{args['tmp']}/io.db")  # shipped defaults: sync_interval=1.0
    done_put = threading.Event()
    times: dict[str, float] = {}
    ts = int(time.time() * 1000)

    def produce() -> None:
        put = buf.put
        t0 = time.perf_counter()
        for i in range(n):
            put((METRICS[i % 10], values[i % nv], ts + i, None))
        times["put"] = time.perf_counter() - t0
        done_put.set()

    taken = 0
    t0 = time.perf_counter()
    producer = threading.Thread(target=produce)
    producer.start()
    while taken < n:
        batch = buf.take(10_000)
        if batch is None:
            time.sleep(0.001)
            continue
        buf.ack(batch)
        taken += len(batch.points)
    t_out = time.perf_counter() - t0
    producer.join()
    buf.close()
    return {"n": n, "in_rate": n / times["put"], "out_rate": n / t_out,
            "put_us": times["put"] / n * 1e6}


def mode_import(args: dict) -> dict:
    t0 = time.perf_counter()
    import plexus  # noqa: F401

    return {"seconds": time.perf_counter() - t0}


def mode_empty(args: dict) -> dict:
    return {"peak_rss_kb": peak_rss_kb()}


def main() -> None:
    args = json.loads(sys.argv[1])
    result = globals()[f"mode_{args['mode']}"](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
