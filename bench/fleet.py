"""A fleet through a platform outage: many devices, one client each, default settings.

    bench/.venv/bin/python bench/fleet.py --devices 100 --outage 15
    bench/.venv/bin/python bench/fleet.py --devices 200 --outage 30 --json bench/results/fleet-200.json

Every device is its own ``Plexus`` client (its own source id, buffer and
uploader thread, all defaults) sending one point every 0.1 s. The devices run
in ``--procs`` worker processes; the local receiver runs in a process of its
own. After ``--steady`` seconds the receiver goes down (connection refused,
as a gateway that is gone) for ``--outage`` seconds, then comes back on the
same port. Measured, from the receiver's record of every request and the
devices' own counters:

- each device's first stored request after the return (the issue's target:
  within 5 s for every device);
- requests per second in 0.5 s bins: the peak after the return against the
  steady rate before the outage (target: within 3x);
- attempts per device per second during the outage (target: about 1 or less);
- points sent, stored, lost and stored twice (targets: 0 and 0);
- the time until every device's buffer was empty again.

The result also records the machine's load average before and after the run
(the devices, the receiver and anything else running share its cores), the
commit and the arguments, so a figure can be read with its conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, PYTHON, ROOT, ReceiverProcess, clean_env  # noqa: E402

BIN = 0.5  # seconds per bin of the request-rate histogram


def run(devices: int, outage: float, steady: float, after: float, procs: int,
        ) -> dict[str, Any]:
    with ReceiverProcess(rate_limit=0.0005, validate=False, store=True) as rx:
        start = time.time() + 2.0  # the workers import plexus and build clients meanwhile
        down_at, up_at = start + steady, start + steady + outage
        end_at = up_at + after
        per = [devices // procs + (1 if i < devices % procs else 0) for i in range(procs)]
        first = 0
        workers = []
        for count in per:
            args = {"url": rx.url, "first": first, "count": count, "start": start,
                    "down_at": down_at, "up_at": up_at, "end_at": end_at}
            first += count
            workers.append(subprocess.Popen(
                [PYTHON, str(BENCH / "fleet_worker.py"), json.dumps(args)],
                stdout=subprocess.PIPE, text=True, env=clean_env()))
        time.sleep(max(0.0, down_at - time.time()))
        rx.ask("down")
        time.sleep(max(0.0, up_at - time.time()))
        rx.ask("up")
        results = []
        for proc in workers:
            out, _ = proc.communicate(timeout=end_at - time.time() + 120)
            results.append(json.loads(out.strip().splitlines()[-1]))
        timeline = rx.ask("timeline")["requests"]
        stored = rx.ask("stored")
    return analyse(results, timeline, stored, devices, start, down_at, up_at, end_at)


def analyse(results: list[dict[str, Any]], timeline: list[list[Any]], stored: dict[str, Any],
            devices: int, start: float, down_at: float, up_at: float, end_at: float,
            ) -> dict[str, Any]:
    device_rows = [d for r in results for d in r["devices"]]
    sent = sum(d["sent"] for d in device_rows)
    kept = sum(stored["per_source"].values())
    first_after: dict[str, float] = {}
    for received_at, status, count, source in timeline:
        if received_at >= up_at and status == 200 and count and source not in first_after:
            first_after[source] = received_at - up_at
    delays = sorted(first_after.get(d["source_id"], float("inf")) for d in device_rows)
    # Request rate: steady (the last 3 s before the outage) and after the return.
    bins: dict[int, int] = {}
    point_bins: dict[int, int] = {}
    for received_at, _status, count, _source in timeline:
        b = int((received_at - start) // BIN)
        bins[b] = bins.get(b, 0) + 1
        point_bins[b] = point_bins.get(b, 0) + (count or 0)
    steady_range = range(int((down_at - start - 3) // BIN), int((down_at - start) // BIN))
    steady_bins = [bins.get(b, 0) for b in steady_range]
    steady_rate = statistics.mean(steady_bins) / BIN if steady_bins else 0.0
    steady_points = statistics.mean(point_bins.get(b, 0) for b in steady_range) / BIN \
        if steady_bins else 0.0
    # From the return until the devices stop sending (their close() flushes after that).
    after_range = range(int((up_at - start) // BIN), int((end_at - start) // BIN))
    after_bins = {b: bins.get(b, 0) for b in after_range}
    peak_rate = max(after_bins.values(), default=0) / BIN
    peak_points = max((point_bins.get(b, 0) for b in after_range), default=0) / BIN
    attempts = sum(d["failures"] for d in device_rows)
    outage = up_at - down_at
    drained = [d["drained_after_up"] for d in device_rows]
    return {
        "devices": devices, "outage_s": round(outage, 1),
        "points_sent": sent, "points_stored": kept, "points_lost": sent - kept,
        "points_stored_twice": stored["duplicates"],
        "points_dropped_by_devices": sum(d["dropped"] for d in device_rows),
        "devices_back": sum(1 for x in delays if x != float("inf")),
        "first_delivery_after_return_s": {
            "min": round(delays[0], 2),
            "median": round(statistics.median(delays), 2),
            "p95": round(delays[int(0.95 * (len(delays) - 1))], 2),
            "max": round(delays[-1], 2),
            "devices_within_5s": sum(1 for x in delays if x <= 5.0)},
        "steady_requests_per_s": round(steady_rate, 1),
        "peak_requests_per_s_after_return": round(peak_rate, 1),
        "peak_over_steady": round(peak_rate / steady_rate, 2) if steady_rate else None,
        "steady_points_per_s": round(steady_points),
        "peak_points_per_s_after_return": round(peak_points),
        "failed_attempts_per_device_per_s_during_outage": round(
            attempts / devices / outage, 2),
        "all_drained_after_return_s": (round(max(drained), 2)
                                       if all(x is not None for x in drained) else None),
        "rate_per_bin_after_return": [after_bins[b] / BIN for b in sorted(after_bins)][:30],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--outage", type=float, default=15.0)
    parser.add_argument("--steady", type=float, default=8.0)
    parser.add_argument("--after", type=float, default=15.0, help="seconds after the return")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = run(args.devices, args.outage, args.steady, args.after, args.procs)
    result["conditions"] = {
        "args": vars(args), "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip() or None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
