"""Peers that are not Plexus clients: a hand-rolled poster and influxdb-client.

- ``handrolled``: httpx + orjson, points built before the clock starts,
  ``batch`` points per request (10,000, our request size, or 1,000), gzip
  level 1 (as ours), one keep-alive connection, POST /ingest to the same
  receiver: the ceiling of the HTTP path in one Python thread.
- ``influx``: influxdb-client's batching WriteApi (batch_size 1000) against
  the local 204 server of receiver_proc.py; one line-protocol string per
  write() call (its cheapest record type), gzip on.
"""

from __future__ import annotations

import gzip
import json
import sys
import time

from common import cpu_seconds, peak_rss_kb


def mode_handrolled(args: dict) -> dict:
    import httpx
    import orjson

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n = args["n"]
    now = int(time.time() * 1000)
    points = [{"metric": METRICS[i % 10], "value": values[i % nv], "timestamp": now + i // 1000}
              for i in range(n)]
    headers = {"x-api-key": "plx_test", "Content-Type": "application/json",
               "Content-Encoding": "gzip"}
    url = f"{args['url']}/ingest"
    size = args.get("batch", 10_000)
    short = 0
    with httpx.Client(trust_env=False) as client:
        c0 = cpu_seconds()
        t0 = time.time()
        for start in range(0, n, size):
            part = points[start:start + size]
            body = orjson.dumps({"source_id": "bench-hand", "points": part})
            r = client.post(url, content=gzip.compress(body, compresslevel=1, mtime=0),
                            headers=headers)
            if r.status_code != 200 or orjson.loads(r.content).get("count") != len(part):
                short += 1
        t1 = time.time()
        c1 = cpu_seconds()
    return {"t0": t0, "t_sent": t1, "t_closed": t1, "cpu": c1 - c0, "sent": n,
            "short_answers": short, "peak_rss_kb": peak_rss_kb()}


def mode_influx(args: dict) -> dict:
    from influxdb_client import InfluxDBClient, WriteOptions, WritePrecision

    sys.path.insert(0, args["bench"])
    from common import METRICS, values_table

    values = values_table()
    nv = len(values)
    n = args["n"]
    client = InfluxDBClient(url=args["url"], token="bench", org="bench", enable_gzip=True)
    write_api = client.write_api(write_options=WriteOptions(
        batch_size=1000, flush_interval=1000, jitter_interval=0, retry_interval=1000))
    write = write_api.write
    ms = WritePrecision.MS
    names = [m.replace(".", "_") for m in METRICS]
    c0 = cpu_seconds()
    t0 = time.time()
    for i in range(n):
        ts = int(time.time() * 1000)
        write("bench", "bench", f"{names[i % 10]} value={values[i % nv]} {ts}", write_precision=ms)
    t_sent = time.time()
    write_api.close()  # flushes what is queued
    client.close()
    t1 = time.time()
    return {"t0": t0, "t_sent": t_sent, "t_closed": t1, "cpu": cpu_seconds() - c0, "sent": n,
            "peak_rss_kb": peak_rss_kb()}


def main() -> None:
    args = json.loads(sys.argv[1])
    result = globals()[f"mode_{args['mode']}"](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
