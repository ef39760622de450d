"""Upload rules, measured: how close a sink stays to its byte budget, and how soon held
points go once a hold clears.

    .venv/bin/python bench/upload_rules.py
    .venv/bin/python bench/upload_rules.py --json bench/results/upload-rules.json

One gateway (built from a rig text, persistent buffer, default batch settings)
and the local receiver, in this process: the rates involved are small.

1. **Budget**: a producer of random readings (they barely compress, about 13
   bytes a point gzipped) at ``--factor`` times ``--budget`` bytes a second for
   ``--seconds``. From the receiver's records: the bytes received in every
   window of 1 s and of 5 s, the largest request, and the average over the
   saturated stretch, against the budget.
2. **Hold**: 100 readings a second of ``cam.frame`` held while a file exists
   (checked every second, the default) for ``--hold`` seconds plus a random
   fraction of a second (so the removal falls anywhere between two checks),
   with ``imu.x`` flowing meanwhile; then the file goes. Measured, over
   ``--trials`` runs: from the file's removal to the first held point at the
   receiver, and to the last; with and without a budget.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plexus.config import load_config_text  # noqa: E402
from plexus.gateway import Gateway  # noqa: E402
from plexus.plugins import load_plugins  # noqa: E402
from plexus.testing import Receiver  # noqa: E402


def gateway_for(url: str, upload: str, tmp: Path) -> Gateway:
    text = (f"source_id: bench-01\napi_key: plx_bench\ngateway_url: {url}\n"
            f"buffer: {{type: sqlite, path: {tmp / 'buf.db'}}}\n"
            f"sinks:\n  - type: plexus\n    upload:\n{upload}")
    registry = load_plugins()
    config = load_config_text(text, str(tmp / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    return Gateway(config, registry)


def window_max(stamps: list[tuple[float, int]], width: float) -> int:
    """The most bytes received in any window of ``width`` seconds (windows start at a request)."""
    best = 0
    j = 0
    total = 0
    for i in range(len(stamps)):
        while j < len(stamps) and stamps[j][0] - stamps[i][0] < width:
            total += stamps[j][1]
            j += 1
        best = max(best, total)
        total -= stamps[i][1]
    return best


def budget_run(budget: int, factor: float, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="plexus-bench-upload-"))
    with Receiver(api_keys=None, store=False) as rx:
        gateway = gateway_for(rx.url, f"      max_bytes_per_s: {budget}\n", tmp)
        gateway.start()
        rng = random.Random(1)
        per_tick = max(1, int(budget * factor / 13 / 50))  # 50 ticks a second
        started = time.time()
        end = time.monotonic() + seconds
        produced = 0
        while time.monotonic() < end:
            for _ in range(per_tick):
                gateway.pipeline.emit("rig.noise", rng.random())
            produced += per_tick
            time.sleep(0.02)
        stopped = time.time()
        records = [r for r in rx.requests if r.body_bytes and r.received_at <= stopped]
        lane = gateway.pipeline.lanes[0]
        backlog = len(lane.buffer)
        gateway.shutdown(0.5)
    stamps = [(r.received_at, r.body_bytes) for r in records]
    # The saturated stretch: from the first request to the end of production.
    span = stopped - records[0].received_at
    sent = sum(b for _, b in stamps)
    return {
        "budget_bytes_per_s": budget, "burst_bytes": budget,
        "offered_bytes_per_s": round(produced * sent / max(1, sum(
            r.count for r in records)) / (stopped - started)),
        "seconds": round(span, 1), "requests": len(records),
        "average_bytes_per_s": round(sent / span),
        "max_bytes_in_1s": window_max(stamps, 1.0),
        "max_bytes_in_5s": window_max(stamps, 5.0),
        "largest_request_bytes": max(b for _, b in stamps),
        "points_waiting_at_the_end": backlog,
    }


def hold_run(hold: float, budget: int | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="plexus-bench-hold-"))
    flag = tmp / "metered"
    flag.touch()
    arrivals: list[tuple[float, str, Any]] = []
    lock = threading.Lock()

    def stamp(point: dict[str, Any]) -> None:
        with lock:
            arrivals.append((time.time(), point["metric"], point["value"]))

    with Receiver(api_keys=None, extra_check=stamp) as rx:
        upload = f"      hold: ['cam.*']\n      hold_while: {{file: {flag}}}\n"
        if budget:
            upload += f"      max_bytes_per_s: {budget}\n"
        gateway = gateway_for(rx.url, upload, tmp)
        gateway.start()
        stop = threading.Event()
        counts = {"cam.frame": 0, "imu.x": 0}

        def produce() -> None:
            n = 0
            while not stop.is_set():
                gateway.pipeline.emit("cam.frame", n)
                gateway.pipeline.emit("imu.x", n)
                n += 1
                counts["cam.frame"] = counts["imu.x"] = n
                time.sleep(0.01)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(hold + random.random())
        held = gateway.status()["sinks"][0]["held"]
        cleared = time.time()
        held_up_to = counts["cam.frame"]  # values below this were emitted while held
        os.unlink(flag)
        time.sleep(2.0)
        stop.set()
        producer.join()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                got = sum(1 for _, m, _ in arrivals if m == "cam.frame")
            if got >= counts["cam.frame"]:
                break
            time.sleep(0.05)
        gateway.shutdown(5.0)
    cam = sorted(t for t, m, _ in arrivals if m == "cam.frame")
    was_held = sorted(t for t, m, v in arrivals if m == "cam.frame" and v < held_up_to)
    return {
        "hold_s": hold, "budget_bytes_per_s": budget, "held_points_at_release": held,
        "held_points_sent_before_release": sum(1 for t in cam if t < cleared),
        "first_held_point_after_release_s": round(was_held[0] - cleared, 2)
        if was_held else None,
        "all_held_points_delivered_after_s": round(was_held[-1] - cleared, 2)
        if len(was_held) >= held_up_to else None,
        "cam_points_delivered": len(cam), "cam_points_emitted": counts["cam.frame"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = {
        "load_before": os.getloadavg(), "cpus": os.cpu_count(),
        "budget": budget_run(args.budget, args.factor, args.seconds),
        "hold": [hold_run(args.hold, None) for _ in range(args.trials)],
        "hold_with_budget": [hold_run(args.hold, args.budget) for _ in range(args.trials)],
        "load_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
