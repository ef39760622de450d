"""CAN measurements of plexus.adapters.can through the whole pipeline.

- ``replay``: the real capture plexus/data/msxii_battery_vt.log (36 BATTERY_VT
  frames of a battery pack) repeated into a longer candump file (same ids and
  payloads, timestamps continued), replayed by the adapter's own replay mode
  at ``replay_speed: 0`` through the real DBC plexus/data/msxii_system_can.dbc,
  into the HTTP sink and the receiver process. The process is pinned to one
  CPU (the receiver runs elsewhere), so frames/s is "on one core".
- ``virtual``: a thread sends the same frames on python-can's virtual bus at
  a fixed rate; the adapter reads the bus; every frame must be decoded and
  every point delivered. CPU % is this process's CPU time over wall time
  (sender thread included) in % of one core.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "plexus" / "data"
LOG = DATA / "msxii_battery_vt.log"
DBC = DATA / "msxii_system_can.dbc"


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def real_frames() -> list[tuple[int, bytes]]:
    frames = []
    for line in LOG.read_text().splitlines():
        parts = line.split()
        can_id, data = parts[2].split("#")
        frames.append((int(can_id, 16), bytes.fromhex(data)))
    return frames


def signals_per_pass() -> int:
    """Points one pass over the capture must give: every frame decoded with the DBC
    by cantools directly (not by the adapter), one point per signal."""
    import cantools

    db = cantools.database.load_file(str(DBC))
    return sum(len(db.decode_message(can_id, data)) for can_id, data in real_frames())


def pipeline_to(url: str, max_points: int | None = None):
    """The pipeline a gateway builds for the plexus sink, at the gateway's defaults
    (memory buffer of 10,000 points, when_full=block, batch 1,000 / 1 s / 10,000)
    unless ``max_points`` raises the buffer cap."""
    from plexus.buffer import DEFAULT_MAX_POINTS, MemoryBuffer
    from plexus.pipeline import Pipeline, SourceContext
    from plexus.sinks.http import HttpSink

    pipeline = Pipeline("bench-can")
    pipeline.add_lane(HttpSink(api_key="plx_test", gateway_url=url),
                      MemoryBuffer(max_points or DEFAULT_MAX_POINTS))
    pipeline.start()
    return pipeline, SourceContext(pipeline)


def mode_replay(args: dict) -> dict:
    from plexus.adapters.can import CanAdapter, CanOptions

    os.sched_setaffinity(0, {args.get("cpu", 0)})
    frames = real_frames()
    repeat = args["repeat"]
    path = Path(args["tmp"]) / "msxii_repeated.log"
    t = 1594172461.0
    with path.open("w") as f:
        for _ in range(repeat):
            for can_id, data in frames:
                f.write(f"({t:.6f}) vcan0 {can_id:03X}#{data.hex().upper()}\n")
                t += 0.0001
    total = repeat * len(frames)
    expected_points = repeat * signals_per_pass()
    pipeline, ctx = pipeline_to(args["url"], args.get("max_points"))
    adapter = CanAdapter(CanOptions(replay=str(path), dbc=[str(DBC)], replay_speed=0.0),
                         name="replay")
    c0, t0 = cpu_seconds(), time.perf_counter()
    adapter.start(ctx)
    while adapter.state != "finished" and adapter.frames < total:
        time.sleep(0.005)
    while adapter.state != "finished":
        time.sleep(0.001)
    t_decoded = time.perf_counter()
    c_decoded = cpu_seconds()
    adapter.stop()
    pipeline.close(120)
    t_delivered = time.perf_counter()
    return {"frames": adapter.frames, "decoded": adapter.decoded, "points": adapter.points,
            "errors": adapter.decode_errors, "fps": adapter.frames / (t_decoded - t0),
            "cpu_pct": (c_decoded - c0) / (t_decoded - t0) * 100,
            "delivered_fps": adapter.frames / (t_delivered - t0),
            "t_delivered_s": t_delivered - t0, "expected_points": expected_points,
            "dropped": pipeline.dropped}


def mode_virtual(args: dict) -> dict:
    import can

    from plexus.adapters.can import CanAdapter, CanOptions

    rate, seconds = args["rate"], args["seconds"]
    frames = real_frames()
    total = int(rate * seconds)
    per_pass = signals_per_pass()
    expected_points = (total // len(frames)) * per_pass + _partial_points(total % len(frames))
    channel = f"bench-{os.getpid()}"
    pipeline, ctx = pipeline_to(args["url"], args.get("max_points"))
    adapter = CanAdapter(CanOptions(interface="virtual", channel=channel,
                                    dbc=[str(DBC)]), name="vbus")
    adapter.start(ctx)
    time.sleep(0.3)  # the adapter's bus is open
    sender = can.Bus(interface="virtual", channel=channel)
    sent = 0
    late = 0.0

    def send_all() -> None:
        nonlocal sent, late
        chunk = max(1, rate // 1000)  # frames per millisecond tick
        start = time.perf_counter()
        while sent < total:
            for _ in range(chunk):
                can_id, data = frames[sent % len(frames)]
                sender.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=False))
                sent += 1
            due = start + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                late = max(late, -delay)

    c0, t0 = cpu_seconds(), time.perf_counter()
    thread = threading.Thread(target=send_all)
    thread.start()
    thread.join()
    t_sent = time.perf_counter()
    deadline = time.monotonic() + 10
    while adapter.frames < total and time.monotonic() < deadline:
        time.sleep(0.005)
    t_read = time.perf_counter()
    c1 = cpu_seconds()
    adapter.stop()
    sender.shutdown()
    pipeline.close(60)
    return {"sent": sent, "frames": adapter.frames, "decoded": adapter.decoded,
            "points": adapter.points, "errors": adapter.decode_errors,
            "dropped": pipeline.dropped, "achieved_rate": sent / (t_sent - t0),
            "cpu_pct": (c1 - c0) / (t_read - t0) * 100, "max_late_s": late,
            "lag_s": t_read - t_sent, "expected_points": expected_points}


def _partial_points(k: int) -> int:
    import cantools

    db = cantools.database.load_file(str(DBC))
    return sum(len(db.decode_message(can_id, data)) for can_id, data in real_frames()[:k])


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    args = json.loads(sys.argv[1])
    result = globals()[f"mode_{args['mode']}"](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
