"""Measurements of the official Plexus SDK (PyPI plexus-python 0.16.0).

Run only by bench/run.py through common.sdk_env(): PYTHONPATH puts
bench/.venv/sdk first (the SDK is imported as ``plexus`` too), HOME is a fresh
temp dir, PLEXUS_GATEWAY_URL is the local receiver, and
PLEXUS_GATEWAY_WS_URL / PLEXUS_ENDPOINT name a closed port on 127.0.0.1, so
its WebSocket fails at once and every send takes its HTTP fallback
(POST /ingest), and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
import time

from common import cpu_seconds, peak_rss_kb


def make_client(args: dict):
    import plexus
    from plexus import Plexus

    assert plexus.__version__ == "0.16.0" and "/sdk/" in plexus.__file__, plexus.__file__
    gw = os.environ["PLEXUS_GATEWAY_URL"]
    ws = os.environ["PLEXUS_GATEWAY_WS_URL"]
    assert gw.startswith("http://127.0.0.1:") and ws.startswith("ws://127.0.0.1:")
    px = Plexus(source_id="bench-sdk", persistent_buffer=args["buffer"] == "persistent",
                **({"max_buffer_size": args["max_buffer"]} if args.get("max_buffer") else {}))
    assert px.gateway_url == gw
    # The WebSocket port is closed, so the first send() would wait up to 5 s
    # for an authentication that cannot come. Start the socket now and wait
    # for its first refusal (its reconnect backoff is then pending, and send()
    # goes straight to HTTP), so that one-time wait stays out of the timings.
    ws_transport = px._ensure_ws()
    deadline = time.monotonic() + 5
    while not ws_transport.reconnect_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    return px


def mode_send_cost(args: dict) -> dict:
    import threading

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n, repeats, threads = args["n"], args["repeats"], args["threads"]
    px = make_client(args)
    if args["api"] == "batch":
        # Flush interval long enough that no flush runs during the loop: the
        # cost of b.send() itself, like ours with an idle uploader.
        b = px.batch(interval_ms=60_000, max_points=5000,
                     max_pending=(n + 10_000) * (repeats + 1))
        b.start()
        send = b.send
    else:
        b = None
        send = px.send

    def loop(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            send(METRICS[i % 10], values[i % nv])

    loop(min(1000, n), 0)  # warm-up
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
    if b is not None:
        b._pending.clear()  # measured the queueing only; do not upload the queue
        b.close()
    px.close()
    return {"wall_us": wall, "cpu_us": cpu, "loop_us": loop_us}


def mode_throughput(args: dict) -> dict:
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n = args["n"]
    px = make_client(args)
    errors = 0
    c0 = cpu_seconds()
    t0 = time.time()
    if args["api"] == "batch":
        # Its documented fast-stream mode, with its defaults except a queue
        # large enough that nothing is evicted while the producer runs ahead.
        with px.batch(interval_ms=args.get("interval_ms", 100.0), max_points=5000,
                      max_pending=n + 10_000) as b:
            send = b.send
            for i in range(n):
                send(METRICS[i % 10], values[i % nv])
            t_sent = time.time()
        dropped = b.dropped
    else:
        send = px.send
        deadline = t0 + args.get("seconds", 1e9)
        sent = 0
        for i in range(n):
            try:
                send(METRICS[i % 10], values[i % nv])
            except Exception:  # noqa: BLE001 - RateLimitedError etc.: count and go on
                errors += 1
            sent += 1
            if time.time() > deadline:
                break
        n = sent
        t_sent = time.time()
        dropped = 0
    px.close()
    t1 = time.time()
    return {"t0": t0, "t_sent": t_sent, "t_closed": t1, "cpu": cpu_seconds() - c0,
            "sent": n, "dropped": dropped, "errors": errors, "peak_rss_kb": peak_rss_kb(),
            "sdk_dropped_points": px.dropped_points}


def mode_burst(args: dict) -> dict:
    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    px = make_client(args)
    with px.batch() as b:  # all defaults: 100 ms, 5,000 points a frame, 200,000 pending
        for i in range(args["n"]):
            b.send(METRICS[i % 10], values[i % nv])
    px.close()
    return {"peak_rss_kb": peak_rss_kb(), "dropped": b.dropped}


def mode_import(args: dict) -> dict:
    t0 = time.perf_counter()
    import plexus  # noqa: F401

    return {"seconds": time.perf_counter() - t0}


def main() -> None:
    args = json.loads(sys.argv[1])
    result = globals()[f"mode_{args['mode']}"](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
