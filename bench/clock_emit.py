"""The cost of Pipeline.emit by clock state (docs/time.md, "What it costs").

    .venv/bin/python bench/clock_emit.py [--rounds 15] [--n 200000]

Measures ns per ``emit(metric, float)`` into one memory buffer whose
uploader never sends during the loop, minus the loop's own cost. States:

- ``trusted``: the system clock is trusted (every ordinary start);
- ``reference``: the system clock is not trusted but a reference is (stamps
  are the monotonic clock plus the reference's offset);
- ``held``: no trustworthy time yet; points wait before the buffers.

Rounds interleave the states so a noisy, shared machine affects them alike;
the table gives the median and the minimum of the rounds. Run the same
script with ``PYTHONPATH`` pointing at another tree to compare commits (a
tree without ``plexus.clock`` measures ``trusted`` only).

On a machine too busy for timings, count instructions instead, which load
does not change: ``--emit-only STATE --n N`` just emits N points, so the
difference between two callgrind runs with different N, divided by the
difference of N, is the instructions one ``emit`` costs::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python bench/clock_emit.py --emit-only trusted --n 20000
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import time
from typing import Any

from plexus.buffer import MemoryBuffer
from plexus.pipeline import Pipeline
from plexus.point import Point
from plexus.sinks.base import SendResult, Sink

METRICS = [f"bench.metric_{i}" for i in range(10)]
VALUES = [float(i) * 0.5 + 0.25 for i in range(97)]


class NullSink(Sink):
    type_name = "null"

    def send(self, points: list[Point], key: str) -> SendResult:
        return SendResult(len(points))


def make_pipeline(state: str, n: int) -> tuple[Pipeline, Any]:
    if "clock" not in inspect.signature(Pipeline).parameters:  # a tree from before plexus.clock
        if state != "trusted":
            raise SystemExit(f"this tree has no clock: state {state} cannot be measured")
        pipeline = Pipeline("bench")
    else:
        from plexus.clock import BUILD_DATE_S, Clock, ManualTime

        if state == "trusted":
            clock = Clock()
        else:
            fake = ManualTime(wall_s=100.0)  # 1970: not trusted
            clock = Clock(source=fake, hold_max_points=n + 10_000)
            if state == "reference":
                fake_now = fake.mono_ns()
                clock.observe("device-link", int(BUILD_DATE_S * 1e9) + 10**12,
                              fake_now, fake_now, resolution_ns=1_000_000)
        pipeline = Pipeline("bench", clock=clock)
    pipeline.add_lane(NullSink(None), MemoryBuffer(n + 10_000), batch_size=10**9, interval=3600.0)
    pipeline.start()
    return pipeline, None


def measure(state: str, n: int) -> float:
    pipeline, _ = make_pipeline(state, n)
    emit = pipeline.emit
    metrics, values, nv = METRICS, VALUES, len(VALUES)
    for i in range(2000):  # warm-up
        emit(metrics[i % 10], values[i % nv])
    t0 = time.perf_counter_ns()
    for i in range(n):
        metrics[i % 10], values[i % nv]
    bare = time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    for i in range(n):
        emit(metrics[i % 10], values[i % nv])
    spent = time.perf_counter_ns() - t0
    pipeline.close(0.0)
    return (spent - bare) / n


def emit_only(state: str, n: int) -> None:
    pipeline, _ = make_pipeline(state, n)
    emit = pipeline.emit
    metrics, values, nv = METRICS, VALUES, len(VALUES)
    for i in range(n):
        emit(metrics[i % 10], values[i % nv])
    pipeline.close(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--states", default="trusted,reference,held")
    parser.add_argument("--emit-only", metavar="STATE", help="emit --n points, measure nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    if args.emit_only:
        emit_only(args.emit_only, args.n)
        return
    states = args.states.split(",")
    results: dict[str, list[float]] = {s: [] for s in states}
    for _ in range(args.rounds):
        for state in states:
            results[state].append(measure(state, args.n))
    print(f"ns per emit(), {args.rounds} rounds of {args.n:,} points")
    print(f"{'state':<10} {'median':>8} {'min':>8}")
    for state, values in results.items():
        print(f"{state:<10} {statistics.median(values):8.0f} {min(values):8.0f}")


if __name__ == "__main__":
    main()
