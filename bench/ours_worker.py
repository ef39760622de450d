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


def mode_send_cost(args: dict) -> dict:
    """µs per send() with the uploader idle (no batch is due during the loop)."""
    import threading

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    n, repeats, threads = args["n"], args["repeats"], args["threads"]
    values = values_table()
    nv = len(values)
    px = make_client(args, batch_size=10**9, flush_interval=3600.0,
                     max_buffer_points=(n + 10_000) * (repeats + 1))
    send = px.send

    def loop(count: int, offset: int) -> None:
        metrics = METRICS
        for i in range(offset, offset + count):
            send(metrics[i % 10], values[i % nv])

    loop(10_000, 0)  # warm-up
    def bare(count: int) -> None:  # the loop's own cost: indexing, no call
        metrics = METRICS
        for i in range(count):
            metrics[i % 10], values[i % nv]

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
    """Send n points as fast as possible; close() delivers them all."""
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    n = args["n"]
    values = values_table()
    nv = len(values)
    px = make_client(args, max_buffer_points=n + 10_000)
    send = px.send
    metrics = METRICS
    c0 = cpu_seconds()
    t0 = time.time()
    for i in range(n):
        send(metrics[i % 10], values[i % nv])
    t_sent = time.time()
    px.close(timeout=300)
    t1 = time.time()
    c1 = cpu_seconds()
    return {"t0": t0, "t_sent": t_sent, "t_closed": t1, "cpu": c1 - c0,
            "delivered_sender": px.stats.delivered, "dropped": px.dropped,
            "peak_rss_kb": peak_rss_kb()}


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
            samples.append((i + 1, current_rss_kb()))
    buffered = px.buffer_size()
    if args.get("buffer") == "persistent":
        time.sleep(1.5)  # let the sync thread move the inbox into SQLite once
        samples.append((n, current_rss_kb()))
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
