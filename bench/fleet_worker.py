"""Devices of bench/fleet.py: one Plexus client (all defaults) and one thread per device."""

from __future__ import annotations

import json
import sys
import threading
import time


def main() -> None:
    args = json.loads(sys.argv[1])
    import logging

    from plexus import Plexus

    logging.basicConfig(level=logging.ERROR)  # every device logs its failures otherwise

    clients = [Plexus(api_key="plx_fleet", source_id=f"dev-{n:04d}", gateway_url=args["url"])
               for n in range(args["first"], args["first"] + args["count"])]
    sent = [0] * len(clients)
    failures_before_down = [0] * len(clients)
    failures_at_up = [0] * len(clients)
    stop = threading.Event()

    def device(i: int) -> None:
        px = clients[i]
        # Devices start spread over one period, as a real fleet is.
        next_at = args["start"] + 0.1 * (i % 10) / 10 + 0.001 * (i // 10)
        while not stop.is_set():
            delay = next_at - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() >= args["end_at"]:
                break
            px.send("reading", sent[i])
            sent[i] += 1
            next_at += 0.1

    threads = [threading.Thread(target=device, args=(i,), daemon=True)
               for i in range(len(clients))]
    for t in threads:
        t.start()
    time.sleep(max(0.0, args["down_at"] - time.time()))
    failures_before_down = [px.stats.failures for px in clients]
    time.sleep(max(0.0, args["up_at"] - time.time()))
    failures_at_up = [px.stats.failures for px in clients]
    drained: list[float | None] = [None] * len(clients)
    while time.time() < args["end_at"]:
        now = time.time()
        for i, px in enumerate(clients):
            if drained[i] is None and px.buffer_size() <= 2:  # only live readings wait
                drained[i] = now - args["up_at"]
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    for px in clients:
        px.close()
    print(json.dumps({"devices": [
        {"source_id": px.source_id, "sent": sent[i],
         "failures": failures_at_up[i] - failures_before_down[i],
         "drained_after_up": drained[i], "dropped": px.dropped}
        for i, px in enumerate(clients)]}), flush=True)


if __name__ == "__main__":
    main()
