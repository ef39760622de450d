"""What running as a service costs: reload time, scrape time, the agent's own points.

    .venv/bin/python bench/service.py [--adapters 8] [--backlog 200000]

A gateway is built in this process from a rig of ``--adapters`` callable
adapters (20 points/s each) and two Plexus sinks (one delivering to a local
receiver, one whose receiver is down, so its buffer holds ``--backlog``
points in SQLite). Then:

- **reload**: ``Reloader.reload()`` on an unchanged file, with one adapter's
  options changed, and with the failing sink's URL changed (a handover of its
  backlog to the new sink); median of 5 each. The signal itself reaches the
  reload within one main-loop tick (1 s at most), not counted here.
- **scrape**: a GET of ``/metrics`` and of ``/healthz`` over loopback, median
  of 50, and the size of the page.
- **agent**: the CPU time of one report (snapshot + points queued), its
  points and their bytes on the wire (gzipped, as the HTTP sink sends them),
  and per day at the default 60 s interval.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=200_000)
    args = parser.parse_args()

    import httpx

    from plexus.codec import compress
    from plexus.config import load_config
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins
    from plexus.service.agent import readings
    from plexus.service.notify import Notifier
    from plexus.service.runner import Service
    from plexus.sinks.http import HttpSink
    from plexus.testing import Receiver

    up, down = Receiver(api_keys=None).start(), Receiver(api_keys=None).start()
    down_port = down.port
    down.go_down()
    spare = Receiver(api_keys=None).start()
    tmp = Path(tempfile.mkdtemp(prefix="plexus-bench-service-"))
    adapters = "".join(
        f"  - type: callable\n    name: a{i}\n    function: tests.gateway_funcs:number\n"
        f"    metric: m{i}\n    interval: 0.05\n" for i in range(args.adapters))

    def rig_text(down_url: str, interval: float = 0.05) -> str:
        return (f"source_id: bench\napi_key: plx_k\nbuffer: {{type: sqlite, path: {tmp / 'b.db'}}}\n"
                "metrics: {listen: '127.0.0.1:0'}\nagent_metrics: {interval: 60}\n"
                "retry: {base: 0.5, max_delay: 5}\n"
                f"adapters:\n{adapters.replace('interval: 0.05', f'interval: {interval}', 1)}"
                f"sinks:\n  - type: plexus\n    name: up\n    gateway_url: {up.url}\n"
                f"  - type: plexus\n    name: down\n    gateway_url: {down_url}\n")

    rig = tmp / "rig.yaml"
    rig.write_text(rig_text(f"http://127.0.0.1:{down_port}"))
    rig.chmod(0o600)
    registry = load_plugins()
    config = load_config(rig, adapter_types=registry.adapters, sink_types=registry.sinks)
    gateway = Gateway(config, registry)
    service = Service(gateway, Notifier(None))
    service.open()
    gateway.start()
    service.started()
    down_lane = next(lane for lane in gateway.pipeline.lanes if lane.sink.name == "down")
    for i in range(args.backlog):  # a backlog for the failing sink alone
        down_lane.buffer.put(("backlog", float(i), 1_700_000_000_000 + i, None))
    time.sleep(2)
    result: dict[str, object] = {"adapters": args.adapters, "backlog_points": len(down_lane.buffer)}

    def reload_times(texts: list[str]) -> list[float]:
        times = []
        for text in texts:
            rig.write_text(text)
            times.append(service.reloader.reload().seconds)
        return times

    same = rig_text(f"http://127.0.0.1:{down_port}")
    result["reload_unchanged_s"] = statistics.median(reload_times([same] * 5))
    result["reload_one_adapter_s"] = statistics.median(reload_times(
        [rig_text(f"http://127.0.0.1:{down_port}", 0.05 + 0.01 * (i + 1)) for i in range(5)]))
    urls = [spare.url, f"http://127.0.0.1:{down_port}"] * 3
    handover = []
    for url in urls[:5]:
        before = len(down_lane.buffer)
        handover += reload_times([rig_text(url)])
        down_lane = next(lane for lane in gateway.pipeline.lanes if lane.sink.name == "down")
        assert isinstance(down_lane.sink, HttpSink)
        assert len(down_lane.buffer) >= min(before, 1)  # handed over, not drained or dropped
    result["reload_sink_handover_s"] = statistics.median(handover)

    url = service.metrics.url
    with httpx.Client() as client:
        for path in ("/metrics", "/healthz"):
            times, size = [], 0
            for _ in range(50):
                started = time.perf_counter()
                answer = client.get(url + path)
                times.append(time.perf_counter() - started)
                size = len(answer.content)
            key = path.strip("/")
            result[f"scrape_{key}_ms"] = round(statistics.median(times) * 1000, 2)
            result[f"scrape_{key}_bytes"] = size

    snapshot = service.figures.snapshot()
    points = readings(snapshot)
    started = time.process_time()
    rounds = 200
    for _ in range(rounds):
        service.agent.report()  # type: ignore[union-attr]
    per_report = (time.process_time() - started) / rounds
    codec = gateway.pipeline.lanes[0].sink.codec("bench")
    sample = [(m, v, 1_700_000_000_000, t) for m, v, t in points]
    wire = len(compress(codec.block([codec.record(p) for p in sample])))
    result.update({
        "agent_points_per_report": len(points),
        "agent_cpu_per_report_ms": round(per_report * 1000, 3),
        "agent_bytes_per_report_gzipped": wire,
        "agent_points_per_day": len(points) * 1440,
        "agent_bytes_per_day": wire * 1440,
        "agent_cpu_per_day_s": round(per_report * 1440, 3),
    })
    service.stopping()
    gateway.shutdown(1.0)
    service.close()
    for receiver in (up, spare):
        receiver.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
