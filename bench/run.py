"""Run the benchmarks, keep the raw results as JSON, and write the tables from them.

    bench/setup.sh                                  # once: bench/.venv with the peers
    bench/.venv/bin/python bench/run.py             # everything, about 12-15 minutes
    bench/.venv/bin/python bench/run.py --quick     # a 3-4 minute smoke version
    bench/.venv/bin/python bench/run.py --only throughput growth
    bench/.venv/bin/python bench/run.py --render bench/results/latest.json
    bench/.venv/bin/python bench/run.py --update-docs   # docs/benchmarks.md from latest.json

A run writes ``bench/results/latest.json`` (``latest-quick.json`` with
``--quick``): every measured value of every run, nothing summarised. The
tables, the ratios and the PASS/MISS verdicts are computed from that file
by the ``render_*`` functions below, both for ``latest.md`` and for the
results part of docs/benchmarks.md (``--update-docs``), so every figure
published there comes from a committed file and this script.

Every measurement runs in its own subprocess; receivers run in processes of
their own, so their CPU is not counted as the sender's. Peers run in the same
rounds as ours, against the same receiver, interleaved, so ratios hold on a
noisy machine. Figures are "median (min / max)" over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    PYTHON,
    ROOT,
    ReceiverProcess,
    clean_env,
    closed_port,
    fmt,
    fmt_summary,
    run_worker,
    sdk_env,
    summary,
)

RATE_LIMIT = 0.0005  # the real gateway's per-source ceiling: one request per 0.5 ms
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_BEGIN = "<!-- bench/run.py --update-docs: generated from bench/results/latest.json -->"
DOC_END = "<!-- end of generated results -->"
#: Points/s a client sends while it delivers a backlog (the RSS-on-disk rows).
RSS_RATE = 20_000
#: A growth curve whose slowest point is more than this times its fastest is "not flat".
FLAT = 1.3

Table = tuple[str, list[str], list[list[str]], list[str]]


def tmpdir() -> str:
    return tempfile.mkdtemp(prefix="plexus-bench-")


def sdk(rx: ReceiverProcess) -> dict[str, str]:
    return sdk_env(tmpdir(), rx.url, closed_port())


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def med(values: list[float]) -> float:
    return summary(values)["median"]


# =====================================================================================
# Measuring: each measure_* returns raw, JSON-ready data (every run of every case).
# =====================================================================================

SEND_CASES = [
    # (label, worker, options)
    ("ours: send(), memory buffer, 1 thread", "ours", dict(buffer="memory", threads=1)),
    ("ours: send(), memory buffer, 4 threads", "ours", dict(buffer="memory", threads=4)),
    ("ours: send(), persistent buffer, 1 thread", "ours", dict(buffer="persistent", threads=1)),
    ("ours: send(), persistent buffer, 4 threads", "ours",
     dict(buffer="persistent", threads=4)),
    ("SDK: px.send() (one HTTP request each), memory buffer, 1 thread", "sdk",
     dict(api="plain", buffer="memory", threads=1)),
    ("SDK: px.send(), persistent buffer (its default), 1 thread", "sdk",
     dict(api="plain", buffer="persistent", threads=1)),
    ("SDK: px.batch() b.send(), 1 thread", "sdk", dict(api="batch", buffer="memory", threads=1)),
    ("SDK: px.batch() b.send(), 4 threads", "sdk", dict(api="batch", buffer="memory", threads=4)),
]


def send_cost_run(rx: ReceiverProcess, who: str, opts: dict[str, Any], n: int,
                  reps: int) -> dict[str, Any]:
    rx.clear()
    args = dict(mode="send_cost", url=rx.url, bench=str(BENCH), tmp=tmpdir(), repeats=reps,
                n=n, **opts)
    if who == "ours":
        return run_worker("ours_worker.py", args)
    return run_worker("sdk_worker.py", args, env=sdk(rx))


def measure_send(quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 200_000
    reps = 3 if quick else 5
    n_plain = 200 if quick else 1000
    cases = {}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        for label, who, opts in SEND_CASES:
            count = n_plain if opts.get("api") == "plain" else n
            res = send_cost_run(rx, who, opts, count, reps)
            cases[label] = {**res, "n": count, "repeats": reps}
    return {"cases": cases}


THROUGHPUT_SENDERS = [
    # (label, worker, options, settings as published beside the row)
    ("ours (memory buffer)", "ours", dict(buffer="memory"), "defaults"),
    ("ours (persistent buffer)", "ours", dict(buffer="persistent"), "defaults"),
    ("SDK px.batch(), memory buffer", "sdk", dict(api="batch", buffer="memory"),
     "max_pending raised to the point count (its default, 200,000, evicts)"),
    ("SDK px.batch(), persistent buffer (its default)", "sdk",
     dict(api="batch", buffer="persistent"),
     "max_pending raised to the point count (its default, 200,000, evicts)"),
    ("SDK px.send() (time-boxed)", "sdk", dict(api="plain", buffer="memory"), "defaults"),
    ("hand-rolled httpx+orjson poster, 10,000-point requests", "peer",
     dict(mode="handrolled", batch=10_000), "our request size"),
    ("hand-rolled httpx+orjson poster, 1,000-point requests", "peer",
     dict(mode="handrolled", batch=1_000), "-"),
    ("influxdb-client WriteApi batch_size=1000", "influx", dict(mode="influx"),
     "batch_size=1000, gzip"),
]
HANDROLLED = [s[0] for s in THROUGHPUT_SENDERS if s[1] == "peer"]


def delivered_run(target: ReceiverProcess, res: dict[str, Any], count: int) -> dict[str, Any]:
    time.sleep(0.2)
    st = target.stats()
    elapsed = (st["last_t"] or res["t0"]) - res["t0"]
    return {"delivered": st["count"], "sent": res.get("sent", count), "elapsed": elapsed,
            "cpu": res.get("cpu"), "rate_limited": st.get("rate_limited", 0),
            "duplicates": st.get("duplicates", 0), "requests": st["requests"],
            "errors": st["errors"], "body_bytes": st["body_bytes"],
            "decoded_bytes": st["decoded_bytes"],
            **{k: res[k] for k in ("dropped", "waited", "backlog", "open_s", "t_sent", "t0",
                                   "t_closed", "peak_rss_kb", "left") if k in res}}


def measure_throughput(quick: bool) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    n_influx = 50_000 if quick else 250_000
    rounds = 1 if quick else 3
    data: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in THROUGHPUT_SENDERS}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx, ReceiverProcess("influx") as ix:
        for _ in range(rounds):
            for label, who, opts, _settings in THROUGHPUT_SENDERS:
                target = ix if who == "influx" else rx
                target.clear()
                count = n_influx if who == "influx" else n
                args = dict(mode="throughput", url=target.url, bench=str(BENCH), tmp=tmpdir(),
                            n=count)
                args.update(opts)  # the peers' worker names its own mode
                if who == "ours":
                    res = run_worker("ours_worker.py", args)
                elif who == "sdk":
                    if opts["api"] == "plain":
                        args.update(seconds=3.0 if quick else 5.0)
                    res = run_worker("sdk_worker.py", args, env=sdk(rx))
                else:
                    res = run_worker("peers_worker.py", args)
                data[label].append(delivered_run(target, res, count))
    return {"n": n, "n_influx": n_influx, "rounds": rounds, "senders": data}


DEFAULT_CLIENTS = [
    ("ours, memory buffer: Plexus()", "ours", dict(buffer="memory")),
    ("ours, persistent buffer: Plexus(persistent_buffer=True)", "ours",
     dict(buffer="persistent")),
    ("SDK: Plexus() and px.batch() (its defaults: persistent buffer, 200,000 pending)", "sdk",
     dict(buffer="persistent")),
]


def measure_defaults(quick: bool) -> dict[str, Any]:
    n = 300_000
    rounds = 1 if quick else 3
    data: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in DEFAULT_CLIENTS}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        for _ in range(rounds):
            for label, who, opts in DEFAULT_CLIENTS:
                rx.clear()
                args = dict(url=rx.url, bench=str(BENCH), tmp=tmpdir(), n=n, **opts)
                if who == "ours":
                    res = run_worker("ours_worker.py", dict(mode="defaults", **args))
                else:
                    res = run_worker("sdk_worker.py", dict(mode="burst", **args), env=sdk(rx))
                time.sleep(0.3)
                st = rx.stats()
                data[label].append({"sent": n, "stored": st["count"],
                                    "duplicates": st.get("duplicates", 0),
                                    "dropped_by_sender": res.get("dropped"),
                                    "peak_rss_kb": res.get("peak_rss_kb"),
                                    "seconds": (res["t_closed"] - res["t0"]) if "t0" in res
                                    else None})
    return {"n": n, "rounds": rounds, "clients": data}


def populate(path: str, points: int) -> dict[str, Any]:
    return run_worker("ours_worker.py", dict(mode="populate", bench=str(BENCH), path=path,
                                              points=points), timeout=1800)


def measure_growth(quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 200_000
    reps = 3 if quick else 5
    out: dict[str, Any] = {"n": n, "repeats": reps, "names": {}, "tags": {}, "threads": {}}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        for k in (10, 1_000, 100_000):
            out["names"][str(k)] = send_cost_run(rx, "ours", dict(buffer="memory", threads=1,
                                                                  metrics=k), n, reps)
        for k in (0, 4, 16):
            out["tags"][str(k)] = send_cost_run(rx, "ours", dict(buffer="memory", threads=1,
                                                                 tags=k), n, reps)
        for k in (1, 4, 16):
            out["threads"][str(k)] = send_cost_run(rx, "ours", dict(buffer="memory", threads=k),
                                                   n, reps)
    backlogs = (0, 100_000, 1_000_000) if quick else (0, 1_000_000, 10_000_000)
    fresh = 100_000 if quick else 1_000_000
    out["backlog"] = {"fresh": fresh, "runs": {}}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        for k in backlogs:
            tmp = tmpdir()
            made = populate(f"{tmp}/buffer.db", k) if k else {"points": 0}
            rx.clear()
            res = run_worker("ours_worker.py", dict(mode="throughput", url=rx.url,
                                                    bench=str(BENCH), tmp=tmp, n=fresh,
                                                    buffer="persistent"), timeout=1800)
            run = delivered_run(rx, res, fresh)
            run["populated"] = made
            out["backlog"]["runs"][str(k)] = run
    return out


def measure_disk(quick: bool) -> dict[str, Any]:
    n = 200_000 if quick else 1_000_000
    dead = f"http://127.0.0.1:{closed_port()}"
    runs = [run_worker("ours_worker.py", dict(mode="disk_bytes", url=dead, bench=str(BENCH),
                                              tmp=tmpdir(), buffer="persistent", n=n))
            for _ in range(1 if quick else 2)]
    return {"n": n, "runs": runs}


def measure_sqlite(quick: bool) -> dict[str, Any]:
    n = 200_000 if quick else 1_000_000
    runs = [run_worker("ours_worker.py", dict(mode="sqlite_io", bench=str(BENCH),
                                               tmp=tmpdir(), n=n))
            for _ in range(1 if quick else 3)]
    return {"n": n, "runs": runs}


def measure_can(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"replay": [], "virtual": None}
    with ReceiverProcess(rate_limit=RATE_LIMIT, cpu=1) as rx:
        for _ in range(1 if quick else 3):
            rx.clear()
            res = run_worker("can_worker.py", dict(mode="replay", url=rx.url, tmp=tmpdir(),
                                                   repeat=500 if quick else 2000))
            time.sleep(0.3)
            res["received"] = rx.stats()["count"]
            out["replay"].append(res)
        rx.clear()
        seconds = 3 if quick else 10
        res = run_worker("can_worker.py", dict(mode="virtual", url=rx.url, rate=8000,
                                               seconds=seconds))
        time.sleep(0.3)
        res["received"] = rx.stats()["count"]
        res["seconds"] = seconds
        out["virtual"] = res
    return out


def measure_memory(quick: bool) -> dict[str, Any]:
    base = [run_worker("ours_worker.py", dict(mode="empty"))["peak_rss_kb"] for _ in range(3)]
    dead = f"http://127.0.0.1:{closed_port()}"
    buffered = {}
    for buf in ("memory", "persistent"):
        for n in (10_000, 1_000_000):
            buffered[f"{buf} {n}"] = run_worker(
                "ours_worker.py", dict(mode="memory", url=dead, bench=str(BENCH), tmp=tmpdir(),
                                       buffer=buf, n=n))
    on_disk = {}
    sizes = (0, 1_000_000, 10_000_000) if quick else (0, 1_000_000, 100_000_000)
    seconds = 3.0 if quick else 5.0
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        for k in sizes:
            tmp = tmpdir()
            made = populate(f"{tmp}/buffer.db", k) if k else {"points": 0, "file_bytes": 0}
            rx.clear()
            res = run_worker("ours_worker.py", dict(mode="rss_backlog", url=rx.url,
                                                    bench=str(BENCH), tmp=tmp, rate=RSS_RATE,
                                                    buffer="persistent", seconds=seconds),
                             timeout=1800)
            res["populated"] = made
            res["received"] = rx.stats()["count"]
            on_disk[str(k)] = res
            subprocess.run(["rm", "-rf", tmp], check=False)
    return {"empty_kb": base, "buffered": buffered, "on_disk": on_disk, "seconds": seconds}


def first_delivery(config: Path) -> float:
    """Seconds from starting plexus-gateway to the first 200 answer to /ingest."""
    exe = Path(PYTHON).with_name("plexus-gateway")
    env = clean_env(HOME=tmpdir())
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "--config", str(config), "--log-level", "debug",
                             "--no-status", "--duration", "30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(ROOT))
    assert proc.stderr is not None
    found = None
    pattern = re.compile(r"POST http://127\.0\.0\.1:\d+/ingest \"HTTP/1\.1 200")
    try:
        for line in proc.stderr:
            if pattern.search(line):
                found = time.perf_counter() - t0
                break
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if found is None:
        raise RuntimeError(f"{config}: no delivery seen")
    return found


def measure_startup(quick: bool) -> dict[str, Any]:
    k = 5 if quick else 10
    # An installed wheel has its bytecode compiled by pip; an editable install (this
    # checkout) has it only once something wrote it, and PYTHONDONTWRITEBYTECODE
    # stops that: compile it first, or the import is timed with compiling included.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "plexus")],
                   check=True)
    ours = [run_worker("ours_worker.py", dict(mode="import"))["seconds"] * 1000 for _ in range(k)]
    with ReceiverProcess() as rx:
        theirs = [run_worker("sdk_worker.py", dict(mode="import"), env=sdk(rx))["seconds"] * 1000
                  for _ in range(k)]
    demo = ROOT / "configs" / "demo.yaml"
    first = [first_delivery(demo) * 1000 for _ in range(2 if quick else 5)]
    return {"import_ms": ours, "sdk_import_ms": theirs, "first_delivery_ms": first}


MEASURE: dict[str, Callable[[bool], dict[str, Any]]] = {
    "send": measure_send, "throughput": measure_throughput, "defaults": measure_defaults,
    "growth": measure_growth, "disk": measure_disk, "sqlite": measure_sqlite,
    "can": measure_can, "memory": measure_memory, "startup": measure_startup,
}


# =====================================================================================
# Rendering: tables, ratios and verdicts, computed from the JSON only.
# =====================================================================================


def throughput_rates(data: dict[str, Any]) -> dict[str, float]:
    """Median delivered points/s of each throughput sender."""
    return {label: med([r["delivered"] / r["elapsed"] for r in runs if r["elapsed"] > 0])
            for label, runs in data["senders"].items()}


def cpu_per_million(runs: list[dict[str, Any]]) -> float:
    return med([r["cpu"] / r["delivered"] * 1e6 for r in runs if r.get("cpu") and r["delivered"]])


def render_send(d: dict[str, Any]) -> list[Table]:
    rows = []
    for label, res in d["cases"].items():
        wall, cpu = summary(res["wall_us"]), summary(res["cpu_us"])
        target, ok = send_target(label, wall["median"])
        rows.append([label, fmt_summary(wall), fmt_summary(cpu) if cpu["n"] else "-",
                     fmt(res["loop_us"]), target, verdict(ok)])
    any_case = next(iter(d["cases"].values()))
    plain = next((c for label, c in d["cases"].items() if "px.send()" in label), any_case)
    return [(
        "1. send() cost per call (µs)",
        ["case", "wall µs/call", "caller-thread CPU µs/call", "loop alone µs", "target", ""],
        rows,
        [f"{any_case['repeats']} runs of {any_case['n']:,} calls each ({plain['n']:,} for the "
         "SDK's plain send(), which makes one HTTP request per call), after a warm-up, in one "
         "subprocess per case.",
         "Ours with the uploader idle during the loop (no batch falls due, and a buffer cap "
         "that holds every call), so this is send() itself; 4 threads: total wall time / "
         "total calls (the GIL serializes them).",
         "'loop alone' is the benchmark loop without the call (picking the metric and value "
         "by index); it is included in the wall and CPU figures, which judge the target.",
         "The SDK's px.send() is synchronous: one POST /ingest per call (urllib, a new "
         "connection each time); its batch mode b.send() only queues, like ours."],
    )]


def send_target(label: str, median: float) -> tuple[str, bool | None]:
    if label == "ours: send(), memory buffer, 1 thread":
        return "≤ 0.8", median <= 0.8
    if label == "ours: send(), persistent buffer, 1 thread":
        return "≤ 5", median <= 5.0
    return "", None


def render_throughput(d: dict[str, Any]) -> list[Table]:
    rates = throughput_rates(d)
    settings = {s[0]: s[3] for s in THROUGHPUT_SENDERS}
    rows = []
    for label, runs in d["senders"].items():
        rl = sum(r["rate_limited"] for r in runs)
        lost = sum(r["sent"] - r["delivered"] for r in runs)
        rows.append([
            label, settings.get(label, "-"),
            fmt_summary(summary([r["delivered"] / r["elapsed"] for r in runs
                                 if r["elapsed"] > 0]), 0),
            fmt(cpu_per_million(runs)),
            f"{sum(r['delivered'] for r in runs):,} / {sum(r['sent'] for r in runs):,}",
            f"{rl:,}" if not label.startswith("influx") else "n/a", f"{lost:,}",
        ])
    wire = []
    for label, runs in d["senders"].items():
        delivered = sum(r["delivered"] for r in runs)
        pts_req = delivered / max(1, sum(r["requests"] for r in runs))
        wire.append([label, fmt(med([r["body_bytes"] / r["delivered"] for r in runs
                                     if r["delivered"]])),
                     fmt(med([r["decoded_bytes"] / r["delivered"] for r in runs
                              if r["delivered"]])), f"{pts_req:,.0f}"])
    best_hand = max(rates[h] for h in HANDROLLED)
    return [(
        "2. Delivered points/s end to end (counted at the receiver)",
        ["sender", "settings", "delivered points/s", "sender CPU s per 1M delivered",
         "delivered / sent (all runs)", "points refused by the rate ceiling", "lost"],
        rows,
        [f"{d['n']:,} points per run ({d['n_influx']:,} for influxdb-client, whose "
         f"throughput would make 1M take minutes), {d['rounds']} round(s), peers interleaved "
         "in each round.",
         "Ours runs at its defaults: since issue 10 a full buffer makes send() wait while "
         "the platform accepts data, so no cap needs raising for a burst to arrive whole.",
         "The plexus receiver runs in its own process with rate_limit_interval=0.0005 "
         "(the real gateway's per-source ceiling), store=False, validate=False; the "
         "influxdb-client peer talks to a 204 server in its own process that counts lines.",
         "points/s = points counted at the receiver ÷ (arrival of the last stored request − "
         "the sender's first call). CPU = user+sys of the sender process over the sending "
         "and the final flush/close (import and set-up excluded).",
         "The hand-rolled poster builds its points before the clock starts and posts them "
         "from one thread over one keep-alive connection, gzip level 1: the ceiling of this "
         f"HTTP path in Python. Its faster size ({fmt(best_hand, 0)} points/s in this run) "
         "judges the ratio targets.",
         "The SDK's plain px.send() costs one HTTP round trip per point, so it runs for a "
         "fixed 5 s (3 s in --quick) instead of the full count."],
    ), (
        "2b. Bytes on the wire per point (gzip on), typical numeric stream",
        ["sender", "bytes/point on the wire", "bytes/point decoded", "points/request"],
        wire,
        ["The stream: 10 metrics (rig.sensor_0..9), values a slow sine plus noise with 3 "
         "decimals, timestamps in ms, no tags. Body bytes of stored requests ÷ points stored.",
         "Ours gzips at level 1; the SDK at level 6 (and adds \"class\" to every point); "
         "the hand-rolled poster at level 1; influxdb-client sends line protocol, gzip."],
    )]


def render_defaults(d: dict[str, Any]) -> list[Table]:
    rows = []
    for label, runs in d["clients"].items():
        lost = [r["sent"] - r["stored"] for r in runs]
        ours = label.startswith("ours")
        rows.append([label, f"{sum(r['stored'] for r in runs):,} / "
                            f"{sum(r['sent'] for r in runs):,}",
                     fmt_summary(summary([float(x) for x in lost]), 0),
                     fmt(med([r["peak_rss_kb"] / 1024 for r in runs if r.get("peak_rss_kb")]), 1),
                     "0 lost" if ours else "", verdict(sum(lost) == 0) if ours else "-"])
    return [(
        "3. Defaults: a 300,000-point burst, then close()",
        ["client, out of the box", "stored / sent (all runs)", "points lost per run",
         "peak RSS MB", "target", ""],
        rows,
        [f"{d['n']:,} send() calls in a tight loop, then close() with its default timeout; "
         f"{d['rounds']} run(s) each; points counted at the receiver (rate ceiling on).",
         "No setting is changed but the ones that name the platform and the buffer file; "
         "the SDK's batch() keeps at most 200,000 points pending and evicts the oldest "
         "beyond that."],
    )]


GROWTH_WHY = {
    "names": "send() keeps no state per metric name, so nothing in it grows with the "
             "names; what differs is the loop's own indexing into a bigger list (the 'loop "
             "alone' column) and cache misses on the name strings, plus this shared "
             "machine's noise (see min / max)",
    "tags": "every call's tags are checked (type and length of each key and value) and "
            "merged with the context's, so the cost grows with the tag count",
    "threads": "the GIL runs one producer at a time; more threads add switching and "
               "contention on the buffer's slow path, not parallelism",
    "backlog": "stored blocks go on the wire as they were stored (no encoding), so a "
               "backlog drains faster than fresh points are encoded, and delivered points/s "
               "rise with it; meanwhile the uploader thread holds the GIL more often, so the "
               "producer's send() calls/s fall",
}


def _growth_table(title: str, key: str, label: str, d: dict[str, Any]) -> Table:
    rows, medians = [], []
    for k, res in d[key].items():
        wall = summary(res["wall_us"])
        medians.append(wall["median"])
        rows.append([f"{int(k):,}", fmt_summary(wall), fmt(res["loop_us"])])
    flat = max(medians) <= FLAT * min(medians)
    notes = [f"Ours, memory buffer, uploader idle; {d['repeats']} runs of {d['n']:,} calls.",
             f"Slowest ÷ fastest: {max(medians) / min(medians):.2f} "
             f"({'flat' if flat else 'not flat'}: flat means ≤ {FLAT})."]
    if not flat:
        notes.append(f"Why it is not flat: {GROWTH_WHY[key]}.")
    return (title, [label, "wall µs/call", "loop alone µs"], rows, notes)


def render_growth(d: dict[str, Any]) -> list[Table]:
    tables = [
        _growth_table("4a. Growth: send() cost with more distinct metric names", "names",
                      "distinct metric names", d),
        _growth_table("4b. Growth: send() cost with more tags per call", "tags",
                      "tags per call", d),
        _growth_table("4c. Growth: send() cost from more threads", "threads", "threads", d),
    ]
    b = d["backlog"]
    rows, rates, sends = [], [], []
    for k, r in b["runs"].items():
        rate = r["delivered"] / r["elapsed"] if r["elapsed"] > 0 else 0.0
        send_rate = r["sent"] / (r["t_sent"] - r["t0"]) if r["t_sent"] > r["t0"] else 0.0
        rates.append(rate)
        sends.append(send_rate)
        rows.append([f"{int(k):,}", f"{r['open_s']:.2f}", f"{send_rate:,.0f}", f"{rate:,.0f}",
                     f"{r['delivered']:,} / {int(k) + r['sent']:,}"])
    flat = max(rates) <= FLAT * min(rates) and max(sends) <= FLAT * min(sends)
    notes = [f"Ours, persistent buffer at its defaults, {b['fresh']:,} new points sent as fast "
             "as possible into a buffer that already holds the backlog, then close(); one run "
             "each.",
             "The backlog was written directly, not point by point: one real block (10,000 "
             "points of the stream above, stored by SqliteBuffer with the Plexus sink's codec) "
             "copied row by row into the blocks table; each copy has its own id, so its own "
             "batch key, and the receiver stores each.",
             "delivered points/s counts backlog and new points at the receiver, from the "
             "first send() to the last stored request; send() calls/s is the new points ÷ the "
             "time the loop took; open s is the time Plexus() took to open the file.",
             f"Slowest ÷ fastest: send() calls/s {max(sends) / min(sends):.2f}, delivered "
             f"points/s {max(rates) / min(rates):.2f} ({'flat' if flat else 'not flat'})."]
    if not flat:
        notes.append(f"Why it is not flat: {GROWTH_WHY['backlog']}.")
    tables.append(("4d. Growth: persistent buffer throughput with points already on disk",
                   ["points already on disk", "open s", "send() calls/s", "delivered points/s",
                    "delivered / (backlog + sent)"], rows, notes))
    return tables


def disk_bytes_per_point(d: dict[str, Any]) -> float:
    return med([r["bytes"] / r["held"] for r in d["runs"] if r["held"]])


def render_disk(d: dict[str, Any]) -> list[Table]:
    rows = []
    for r in d["runs"]:
        files = ", ".join(f"{k.split('buffer.db', 1)[-1] or 'db'} {v:,}"
                          for k, v in sorted(r["files"].items()))
        rows.append([f"{r['held']:,}", f"{r['bytes']:,}", files,
                     fmt(r["bytes"] / r["held"]) if r["held"] else "-"])
    bpp = disk_bytes_per_point(d)
    rows.append(["median", "", "", fmt(bpp)])
    return [(
        "5. Bytes per point on disk, persistent buffer, typical numeric stream",
        ["points held", "bytes on disk", "files (bytes)", "bytes/point"],
        rows,
        [f"{d['n']:,} points of the stream above sent with the platform away (nothing leaves), "
         "then close(), which syncs: the inbox moved into SQLite, the WAL checkpointed.",
         "Bytes on disk = the database + its WAL + inbox segments left, ÷ the points the "
         "buffer holds (plexus-gateway buffer's count). Target ≤ 10: "
         f"{verdict(bpp <= 10)}."],
    )]


def render_sqlite(d: dict[str, Any]) -> list[Table]:
    return [(
        "6. Persistent buffer (SqliteBuffer) alone, shipped crash-safety settings",
        ["", "points/s"],
        [["in (put, one producer thread, while the consumer drains)",
          fmt_summary(summary([r["in_rate"] for r in d["runs"]]), 0)],
         ["out (take 10,000 + ack, until all are acknowledged)",
          fmt_summary(summary([r["out_rate"] for r in d["runs"]]), 0)]],
        [f"{d['n']:,} points per run, producer and consumer at once, no network: the buffer "
         "alone. sync_interval=1.0 s (fsync + move into SQLite every second), WAL, "
         "synchronous=NORMAL."],
    )]


def render_can(d: dict[str, Any]) -> list[Table]:
    replays = d["replay"]
    ok = all(r["received"] == r["expected_points"] and r["errors"] == 0 for r in replays)
    delivered_fps = summary([r["delivered_fps"] for r in replays])
    rows = [[
        "replay of a real capture through a real DBC, as fast as possible, one core",
        "defaults (memory buffer 10,000, when_full=block)",
        f"{fmt_summary(summary([r['fps'] for r in replays]), 0)} decoded; "
        f"{fmt_summary(delivered_fps, 0)} delivered",
        f"{fmt(med([r['cpu_pct'] for r in replays]), 0)}%",
        f"{sum(r['received'] for r in replays):,} of "
        f"{sum(r['expected_points'] for r in replays):,}",
        "≥ 20,000 frames/s delivered, every point", verdict(ok and delivered_fps["median"] >= 20_000),
    ]]
    v = d["virtual"]
    zero = (v["frames"] == v["sent"] and v["errors"] == 0 and v["dropped"] == 0
            and v["received"] == v["expected_points"])
    rows.append([f"python-can virtual bus at 8,000 frames/s for {v['seconds']} s",
                 "defaults (memory buffer 10,000, when_full=block)",
                 f"{v['achieved_rate']:,.0f} sent; {v['frames']:,} of {v['sent']:,} read",
                 f"{v['cpu_pct']:.0f}%", f"{v['received']:,} of {v['expected_points']:,}",
                 "zero drops", verdict(zero)])
    return [(
        "7. CAN adapter (plexus.adapters.can)",
        ["case", "settings", "frames/s", "CPU (% of one core)",
         "points at the receiver of frames × signals", "target", ""],
        rows,
        ["Capture: plexus/data/msxii_battery_vt.log (36 real BATTERY_VT frames, multiplexed) "
         "repeated into a longer candump file with the same ids and payloads; DBC: "
         "plexus/data/msxii_system_can.dbc. frames × signals: every frame decoded by cantools "
         "directly (not by the adapter), one point per signal; the receiver's count must "
         "equal it.",
         "Replay: the adapter's own replay mode (replay_speed 0) reads the file with "
         "python-can's LogReader, decodes with cantools and feeds the pipeline, HTTP sink "
         "included, at the gateway's default buffer and batch settings; the process is "
         "pinned to CPU 0, the receiver to CPU 1. 'decoded' is frames ÷ time until the "
         "adapter finished the file; 'delivered' is frames ÷ time until close() had every "
         "point stored.",
         "Virtual bus: a thread in the same process sends the same frames, paced; CPU % "
         "includes that sender thread."],
    )]


def rss_flat(d: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of each on-disk backlog run and the growth over the empty buffer."""
    peaks = {int(k): r["peak_rss_kb"] / 1024 for k, r in d["on_disk"].items()}
    base = peaks.get(0, min(peaks.values()))
    return {"peaks": peaks, "growth": {k: v - base for k, v in peaks.items()}}


def persistent_growth(d: dict[str, Any]) -> float:
    """MB of RSS the persistent buffer gained between 1,000 and 1,000,000 points
    buffered (the first sample of the 10,000-point run, the last of the 1M run)."""
    first = d["buffered"]["persistent 10000"]["samples"][0][1]
    last = d["buffered"]["persistent 1000000"]["samples"][-1][1]
    return (last - first) / 1024


def render_memory(d: dict[str, Any]) -> list[Table]:
    base = med(d["empty_kb"])
    rows = []
    for key, res in d["buffered"].items():
        buf, n = key.split()
        above = (res["peak_rss_kb"] - base) / 1024
        target, ok = "", None
        if buf == "memory" and n == "10000":
            target, ok = "≤ 20 MB above", above <= 20
        if buf == "persistent" and n == "1000000":
            grew = persistent_growth(d)
            target, ok = f"flat as it grows: 1,000 → 1,000,000 points {grew:+.0f} MB, ≤ 16", \
                grew <= 16
        last = res["samples"][-1]
        parts = (f"; at the end: heap (RssAnon) {last[2] / 1024:.0f} MB, mapped files "
                 f"(RssFile) {last[3] / 1024:.0f} MB" if len(last) == 4 else "")
        rows.append([f"ours, {buf} buffer, {int(n):,} points buffered",
                     f"{res['peak_rss_kb'] / 1024:.1f}", f"{above:.1f}{parts}", target,
                     verdict(ok)])
    mem_small, mem_big = d["buffered"]["memory 10000"], d["buffered"]["memory 1000000"]
    per_point = (mem_big["peak_rss_kb"] - mem_small["peak_rss_kb"]) * 1024 / 990_000
    flat = rss_flat(d)
    for k, res in d["on_disk"].items():
        growth = flat["growth"][int(k)]
        anon, file = res.get("anon_kb") or [0], res.get("file_kb") or [0]
        judged = int(k) > 0
        rows.append([f"ours, persistent buffer opened on {int(k):,} points on disk: sending "
                     f"{RSS_RATE:,} points/s for {d['seconds']:.0f} s while delivering",
                     f"{res['peak_rss_kb'] / 1024:.1f}",
                     f"{(res['peak_rss_kb'] - base) / 1024:.1f}; {growth:+.1f} vs an empty "
                     f"buffer; open {res['open_s']:.2f} s; peak heap (RssAnon) "
                     f"{max(anon) / 1024:.0f} MB, mapped files (RssFile) {max(file) / 1024:.0f} MB",
                     "flat: ≤ 16 MB over the empty buffer" if judged else "",
                     verdict(growth <= 16) if judged else "-"])
    return [(
        "8. Memory (peak RSS, MB)",
        ["case", "peak RSS", "above an empty interpreter", "target", ""],
        rows,
        [f"Empty interpreter (python with json/resource imported): {base / 1024:.1f} MB peak "
         "RSS (VmHWM). 'points buffered' runs point at a closed local port with no batch due, "
         "so everything stays in the buffer.",
         f"The memory buffer keeps about {per_point:.0f} bytes a point in RAM (from the two "
         "memory-buffer rows: the RSS difference ÷ 990,000 points).",
         "On disk: a backlog written as in 4d; a client opened on it sends a steady "
         f"{RSS_RATE:,} points/s while its uploader delivers the backlog at full speed (a "
         "vehicle back in coverage); peak RSS (VmHWM) of the whole process, and the peaks of "
         "its heap and of its mapped files (the inbox segments, which the kernel can drop "
         "and re-read), sampled every 0.1 s."],
    )]


def render_startup(d: dict[str, Any]) -> list[Table]:
    ours = summary(d["import_ms"])
    return [(
        "9. Start-up",
        ["case", "ms", "target", ""],
        [["import plexus (ours)", fmt_summary(ours, 0), "≤ 150", verdict(ours["median"] <= 150)],
         ["import plexus (the SDK, for reference)", fmt_summary(summary(d["sdk_import_ms"]), 0),
          "", "-"],
         ["plexus-gateway --config configs/demo.yaml: time to first delivered point",
          fmt_summary(summary(d["first_delivery_ms"]), 0), "", "-"]],
        [f"import: {len(d['import_ms'])} fresh interpreters, time around the import statement "
         "alone, with the bytecode compiled beforehand (as pip does for an installed wheel).",
         "First delivery: from starting the process to the first 200 answer to POST /ingest "
         "of the in-process local receiver (local_receiver: enabled), read from the debug "
         "log. The demo's batch interval is 0.5 s, so most of this is that wait."],
    )]


def render_targets(r: dict[str, Any]) -> list[Table]:
    """Issue 10's targets (and the earlier ratio targets), each from the JSON."""
    rows: list[list[str]] = []

    def row(what: str, measured: str, target: str, ok: bool | None) -> None:
        rows.append([what, measured, target, verdict(ok)])

    missing = "not measured in this run"
    if "throughput" in r:
        t = r["throughput"]
        rates = throughput_rates(t)
        hand = max(rates[h] for h in HANDROLLED)
        pers, mem = rates["ours (persistent buffer)"], rates["ours (memory buffer)"]
        pers_cpu = cpu_per_million(t["senders"]["ours (persistent buffer)"])
        mem_cpu = cpu_per_million(t["senders"]["ours (memory buffer)"])
        row("persistent buffer: delivered points/s", f"{pers:,.0f}", "≥ 250,000",
            pers >= 250_000)
        row("persistent buffer ÷ hand-rolled poster (the faster size)",
            f"{pers / hand * 100:.0f}%", "≥ 75%", pers >= 0.75 * hand)
        row("persistent buffer: sender CPU s per 1M delivered", fmt(pers_cpu), "≤ 3",
            pers_cpu <= 3)
    if "send" in r:
        c = r["send"]["cases"]
        p = med(c["ours: send(), persistent buffer, 1 thread"]["wall_us"])
        row("persistent buffer: send() µs, median", fmt(p), "≤ 5", p <= 5)
    else:
        row("persistent buffer: send() µs, median", missing, "≤ 5", None)
    if "disk" in r:
        bpp = disk_bytes_per_point(r["disk"])
        row("persistent buffer: bytes per point on disk", fmt(bpp), "≤ 10", bpp <= 10)
    if "memory" in r:
        grew = persistent_growth(r["memory"])
        row("persistent buffer: RSS as 1,000,000 points are buffered (vs 1,000)",
            f"{grew:+.1f} MB", "flat (≤ 16 MB more)", grew <= 16)
        flat = rss_flat(r["memory"])
        for k, g in sorted(flat["growth"].items()):
            if k:
                row(f"persistent buffer: RSS with {k:,} points on disk",
                    f"{g:+.1f} MB vs empty", "flat (≤ 16 MB more)", g <= 16)
    if "throughput" in r:
        row("memory buffer ÷ hand-rolled poster (the faster size)", f"{mem / hand * 100:.0f}%",
            "≥ 95%", mem >= 0.95 * hand)
        row("memory buffer: sender CPU s per 1M delivered", fmt(mem_cpu), "≤ 1.0",
            mem_cpu <= 1.0)
    if "send" in r:
        m = med(r["send"]["cases"]["ours: send(), memory buffer, 1 thread"]["wall_us"])
        row("memory buffer: send() µs, median", fmt(m), "≤ 0.8", m <= 0.8)
    if "defaults" in r:
        for label, runs in r["defaults"]["clients"].items():
            if label.startswith("ours"):
                lost = sum(x["sent"] - x["stored"] for x in runs)
                row(f"defaults, {label.split(':')[0]}: points lost of a 300,000-point burst",
                    f"{lost:,}", "0", lost == 0)
    if "throughput" in r:
        sdk_best = max(v for k, v in rates.items() if k.startswith("SDK"))
        influx = rates["influxdb-client WriteApi batch_size=1000"]
        row("ours (memory) ÷ the SDK's best mode", f"{mem / sdk_best:.2f}×", "≥ 1.5×",
            mem >= 1.5 * sdk_best)
        row("ours (memory) ÷ influxdb-client", f"{mem / influx:.2f}×", "≥ 3×",
            mem >= 3 * influx)
        ours_runs = t["senders"]["ours (memory buffer)"] + t["senders"]["ours (persistent buffer)"]
        clean = all(x["rate_limited"] == 0 and x["delivered"] == x["sent"] for x in ours_runs)
        row("points lost or refused by the rate ceiling (ours, all runs)",
            "0" if clean else "some", "0", clean)
    return [("0. Targets (issue 10), from the tables below", ["target", "measured", "goal", ""],
             rows, ["Each verdict compares the median of the runs in the section named with "
                    "the goal; ratios use the medians of the same run."])]


RENDER: dict[str, Callable[[dict[str, Any]], list[Table]]] = {
    "send": render_send, "throughput": render_throughput, "defaults": render_defaults,
    "growth": render_growth, "disk": render_disk, "sqlite": render_sqlite, "can": render_can,
    "memory": render_memory, "startup": render_startup,
}


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any], heading: str = "###") -> str:
    meta = results["meta"]
    out = [f"`{meta['command']}`, {meta['date']}, total {meta['total_s']:.0f} s, on "
           f"{meta['machine']}.", ""]
    if meta.get("quick"):
        out += ["**These figures come from a `--quick` run** (fewer points and rounds); the "
                "full run publishes the real ones.", ""]
    tables = render_targets(results)
    for name in MEASURE:
        if name in results:
            tables += RENDER[name](results[name])
    for title, header, rows, notes in tables:
        out += [f"{heading} {title}", "", md_table(header, rows), ""]
        out += [f"- {n}" for n in notes]
        if notes:
            out.append("")
    return "\n".join(out)


# =====================================================================================


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()} "
            f"({platform.python_implementation()}), {platform.system()} {platform.release()}")


def update_docs(results_path: Path) -> None:
    results = json.loads(results_path.read_text())
    text = DOC.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise SystemExit(f"{DOC} has no generated-results markers")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    body = render(results)
    DOC.write_text(f"{head}{DOC_BEGIN}\n\n{body}\n{DOC_END}{tail}")
    print(f"{DOC} updated from {results_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 3-4 minute smoke version")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"sections: {' '.join(MEASURE)} (others are kept from the last "
                             "run of the same kind)")
    parser.add_argument("--render", metavar="JSON", help="print the markdown of a results file")
    parser.add_argument("--update-docs", nargs="?", const=str(RESULTS / "latest.json"),
                        metavar="JSON", help="rewrite the results part of docs/benchmarks.md "
                                             "(default: bench/results/latest.json)")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.update_docs:
        update_docs(Path(args.update_docs))
        return 0
    unknown = [s for s in args.only or [] if s not in MEASURE]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {' '.join(MEASURE)}")
    RESULTS.mkdir(exist_ok=True)
    name = "latest-quick" if args.quick else "latest"
    path = RESULTS / f"{name}.json"
    results: dict[str, Any] = {}
    if args.only and path.exists():
        results = json.loads(path.read_text())  # keep the sections not re-run
    command = "bench/.venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    t0 = time.time()
    timings = results.get("meta", {}).get("section_s", {})
    for section, measure in MEASURE.items():
        if args.only and section not in args.only:
            continue
        s0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {section} ...", flush=True)
        results[section] = measure(args.quick)
        timings[section] = round(time.time() - s0, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {section}: {timings[section]:.0f} s", flush=True)
    results["meta"] = {"machine": machine(), "command": command, "quick": args.quick,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "total_s": sum(timings.values()), "section_s": timings,
                       "run_s": round(time.time() - t0, 1)}
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = render(results, heading="##")
    (RESULTS / f"{name}.md").write_text(f"# plexus benchmarks\n\n{md}\n")
    print("\n" + md, flush=True)
    print(f"\nwritten: {path} and {RESULTS / (name + '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
