"""Throughput of the mqtt, influxdb and nats sinks against their real servers.

    .venv/bin/python bench/sinks.py [--points 50000] [--batch 1000] [--runs 3]

Each server is started on free 127.0.0.1 ports (as the tests do: mosquitto,
Debian's influxd, nats-server with JetStream), a sink is opened, and
``--points`` points go through ``sink.send`` in batches of ``--batch``, each
with its own key, the way the uploader calls it. Printed: points/s (wall
clock, median of the runs, min-max) and the sender's CPU seconds per 100k
points. The servers share the machine's cores with the sender, so these are
numbers for one box, not for a network.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plexus.sinks.base import Sink  # noqa: E402
from plexus.sinks.influxdb import InfluxdbSink, InfluxdbSinkOptions  # noqa: E402
from plexus.sinks.mqtt import MqttSink, MqttSinkOptions  # noqa: E402
from plexus.sinks.nats import NatsSink, NatsSinkOptions  # noqa: E402
from tests.adapters.mosquitto import MosquittoBroker  # noqa: E402
from tests.sinks.servers import InfluxServer, NatsServer  # noqa: E402

T0 = 1_700_000_000_000


def make_points(n: int) -> list[tuple[str, Any, int, dict[str, str] | None]]:
    tags = {"vehicle": "truck-7", "bus": "can0"}
    metrics = [f"engine.sensor{i}" for i in range(20)]
    return [(metrics[i % 20], 1000.0 + (i % 977) * 0.25, T0 + i, tags) for i in range(n)]


def measure(sink: Sink, points: list[Any], batch: int, run: int) -> tuple[float, float]:
    """(points per second, CPU seconds per 100k points) for one pass."""
    sink.send(points[:batch], f"warm-{run}")
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(points), batch):
        result = sink.send(points[start:start + batch], f"run{run}-{start}")
        assert result.delivered == len(points[start:start + batch]), result
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(points) / wall, cpu / len(points) * 100_000


def bench(name: str, make_sink: Callable[[], Sink], points: list[Any], batch: int,
          runs: int) -> str:
    rates, cpus = [], []
    for run in range(runs):
        sink = make_sink()
        sink.open("bench-01")
        try:
            rate, cpu = measure(sink, points, batch, run)
        finally:
            sink.close()
        rates.append(rate)
        cpus.append(cpu)
    return (f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f} / {max(rates):,.0f})"
            f" | {statistics.median(cpus):.2f} |")


async def _add_stream(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name="BENCH", subjects=["bench.>"])
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    points = make_points(args.points)
    rows = ["| sink | points/s, median (min / max) | sender CPU s per 100k points |",
            "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with MosquittoBroker(base / "mosquitto") as broker:
            for qos in (1, 2):
                rows.append(bench(
                    f"mqtt, QoS {qos}, one message per point",
                    lambda q=qos: MqttSink(MqttSinkOptions(host="127.0.0.1", port=broker.port,
                                                           qos=q)),
                    points, args.batch, args.runs))
            rows.append(bench(
                "mqtt, QoS 1, batch: true (JSON Lines, one message per topic)",
                lambda: MqttSink(MqttSinkOptions(host="127.0.0.1", port=broker.port,
                                                 topic="plexus/{source_id}", batch=True)),
                points, args.batch, args.runs))
        with InfluxServer(base / "influx") as influx:
            influx.query("CREATE DATABASE bench")
            rows.append(bench(
                "influxdb 1.x, /write, gzip",
                lambda: InfluxdbSink(InfluxdbSinkOptions(url=influx.url, database="bench")),
                points, args.batch, args.runs))
        with NatsServer(base / "nats") as server:
            asyncio.run(_add_stream(server.url))
            rows.append(bench(
                "nats JetStream, one message per batch",
                lambda: NatsSink(NatsSinkOptions(servers=[server.url], subject="bench.x")),
                points, args.batch, args.runs))
    print(f"{args.points:,} points in batches of {args.batch}, {args.runs} runs each\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
