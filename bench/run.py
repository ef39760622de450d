"""Run every benchmark and print one table (also written to bench/results/latest.md).

    bench/setup.sh                        # once: bench/.venv with the peers
    bench/.venv/bin/python bench/run.py   # the whole table, < 10 minutes
    bench/.venv/bin/python bench/run.py --quick   # a ~1-minute smoke version

Every measurement runs in its own subprocess; receivers run in processes of
their own, so their CPU is not counted as the sender's. Peers run in the same
rounds as ours, against the same receiver, interleaved, so ratios hold on a
noisy machine. Numbers are "median (min / max)" over the runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
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


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


class Report:
    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str], list[list[str]], list[str]]] = []

    def table(self, title: str, header: list[str], rows: list[list[str]],
              notes: list[str] | None = None) -> None:
        self.sections.append((title, header, rows, notes or []))
        print(f"\n## {title}\n", flush=True)
        print(self._md(header, rows), flush=True)
        for note in notes or []:
            print(f"- {note}", flush=True)

    @staticmethod
    def _md(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)

    def markdown(self, preamble: str) -> str:
        out = [preamble]
        for title, header, rows, notes in self.sections:
            out += [f"## {title}", "", self._md(header, rows), ""]
            out += [f"- {n}" for n in notes]
            if notes:
                out.append("")
        return "\n".join(out)


def tmpdir() -> str:
    return tempfile.mkdtemp(prefix="plexus-bench-")


def sdk(rx: ReceiverProcess) -> dict[str, str]:
    return sdk_env(tmpdir(), rx.url, closed_port())


# 1. send() cost -------------------------------------------------------------------


def bench_send_cost(report: Report, quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 200_000
    reps = 3 if quick else 5
    n_plain = 200 if quick else 1000
    b = str(BENCH)
    results: dict[str, Any] = {}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        cases = [
            ("ours: send(), memory buffer, 1 thread", "ours", dict(buffer="memory", threads=1)),
            ("ours: send(), memory buffer, 4 threads", "ours", dict(buffer="memory", threads=4)),
            ("ours: send(), persistent buffer, 1 thread", "ours",
             dict(buffer="persistent", threads=1)),
            ("ours: send(), persistent buffer, 4 threads", "ours",
             dict(buffer="persistent", threads=4)),
            ("SDK: px.send() (one HTTP request each), memory buffer, 1 thread", "sdk",
             dict(api="plain", buffer="memory", threads=1)),
            ("SDK: px.send(), persistent buffer (its default), 1 thread", "sdk",
             dict(api="plain", buffer="persistent", threads=1)),
            ("SDK: px.send(), memory buffer, 4 threads", "sdk",
             dict(api="plain", buffer="memory", threads=4)),
            ("SDK: px.batch() b.send(), 1 thread", "sdk",
             dict(api="batch", buffer="memory", threads=1)),
            ("SDK: px.batch() b.send(), 4 threads", "sdk",
             dict(api="batch", buffer="memory", threads=4)),
        ]
        rows = []
        for label, who, opts in cases:
            rx.clear()
            args = dict(mode="send_cost", url=rx.url, bench=b, tmp=tmpdir(), repeats=reps,
                        n=n_plain if opts.get("api") == "plain" else n, **opts)
            if who == "ours":
                res = run_worker("ours_worker.py", args)
            else:
                res = run_worker("sdk_worker.py", args, env=sdk(rx))
            wall, cpu = summary(res["wall_us"]), summary(res["cpu_us"])
            results[label] = wall
            target, ok = "", None
            if label == "ours: send(), memory buffer, 1 thread":
                target, ok = "≤ 1.0", wall["median"] <= 1.0
            elif label == "ours: send(), persistent buffer, 1 thread":
                target, ok = "≤ 12", wall["median"] <= 12.0
            rows.append([label, fmt_summary(wall), fmt_summary(cpu) if cpu["n"] else "-",
                         fmt(res["loop_us"]), target, verdict(ok)])
    report.table(
        "1. send() cost per call (µs)",
        ["case", "wall µs/call", "caller-thread CPU µs/call", "loop alone µs", "target", ""],
        rows,
        [f"{reps} runs of {n:,} calls each ({n_plain:,} for the SDK's plain send(), which "
         "makes one HTTP request per call), after a warm-up, in one subprocess per case.",
         "Ours with the uploader idle during the loop (no batch falls due), so this is "
         "send() itself; 4 threads: total wall time / total calls (the GIL serializes them).",
         "'loop alone' is the benchmark loop without the call (picking the metric and value "
         "by index); it is included in the wall and CPU figures, which judge the target.",
         "The SDK's px.send() is synchronous: one POST /ingest per call (urllib, a new "
         "connection each time), so its cost is a network round trip; its batch mode "
         "b.send() only queues, like ours."],
    )
    return results


# 2. + 7. end-to-end throughput and bytes on the wire --------------------------------


def bench_throughput(report: Report, quick: bool) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    n_influx = 50_000 if quick else 250_000
    rounds = 1 if quick else 3
    b = str(BENCH)
    senders = [
        ("ours (memory buffer)", "ours", dict(buffer="memory")),
        ("ours (persistent buffer)", "ours", dict(buffer="persistent")),
        ("SDK px.batch(), memory buffer", "sdk", dict(api="batch", buffer="memory")),
        ("SDK px.batch(), persistent buffer (default)", "sdk",
         dict(api="batch", buffer="persistent")),
        ("SDK px.send() (time-boxed)", "sdk", dict(api="plain", buffer="memory")),
        ("hand-rolled httpx+orjson poster (ceiling)", "peer", dict(mode="handrolled")),
        ("influxdb-client WriteApi batch_size=1000", "influx", dict(mode="influx")),
    ]
    data: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in senders}
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx, ReceiverProcess("influx") as ix:
        for _ in range(rounds):
            for label, who, opts in senders:
                target = ix if who == "influx" else rx
                target.clear()
                count = n_influx if who == "influx" else n
                args = dict(mode="throughput", url=target.url, bench=b, tmp=tmpdir(), n=count)
                args.update(opts)
                if who == "ours":
                    res = run_worker("ours_worker.py", args)
                elif who == "sdk":
                    if opts["api"] == "plain":
                        args.update(n=count, seconds=3.0 if quick else 5.0)
                    res = run_worker("sdk_worker.py", args, env=sdk(rx))
                else:
                    res = run_worker("peers_worker.py", args)
                time.sleep(0.2)
                st = target.stats()
                sent = res.get("sent", count)
                elapsed = (st["last_t"] or res["t0"]) - res["t0"]
                data[label].append({
                    "rate": st["count"] / elapsed if elapsed > 0 else 0.0,
                    "cpu_per_m": res["cpu"] / st["count"] * 1e6 if st["count"] else None,
                    "delivered": st["count"], "sent": sent,
                    "rate_limited": st.get("rate_limited", 0),
                    "wire": st["body_bytes"] / st["count"] if st["count"] else None,
                    "json": st["decoded_bytes"] / st["count"] if st["count"] else None,
                    "requests": st["requests"], "errors": st["errors"],
                })
    med = {k: summary([r["rate"] for r in v])["median"] for k, v in data.items()}
    ours = med["ours (memory buffer)"]
    sdk_best = max(med["SDK px.batch(), memory buffer"],
                   med["SDK px.batch(), persistent buffer (default)"],
                   med["SDK px.send() (time-boxed)"])
    influx = med["influxdb-client WriteApi batch_size=1000"]
    ceiling = med["hand-rolled httpx+orjson poster (ceiling)"]
    rows = []
    for label, runs in data.items():
        lost = sum(r["sent"] - r["delivered"] for r in runs)
        rl = sum(r["rate_limited"] for r in runs)
        rows.append([
            label, fmt_summary(summary([r["rate"] for r in runs]), 0),
            fmt(summary([r["cpu_per_m"] for r in runs])["median"]),
            f"{sum(r['delivered'] for r in runs):,} / {sum(r['sent'] for r in runs):,}",
            f"{rl:,}" if label.startswith(("ours", "SDK", "hand")) else "n/a",
            str(lost),
        ])
    ours_runs = data["ours (memory buffer)"] + data["ours (persistent buffer)"]
    zero_loss = all(r["rate_limited"] == 0 and r["delivered"] == r["sent"] for r in ours_runs)
    targets = [
        ["ours ÷ SDK best mode", f"{ours / sdk_best:.2f}×", "≥ 1.5×",
         verdict(ours >= 1.5 * sdk_best)],
        ["ours ÷ influxdb-client", f"{ours / influx:.2f}×", "≥ 3×", verdict(ours >= 3 * influx)],
        ["ours ÷ hand-rolled ceiling", f"{ours / ceiling * 100:.0f}%", "≥ 85%",
         verdict(ours >= 0.85 * ceiling)],
        ["points lost to the rate ceiling (ours, all runs)",
         "0" if zero_loss else "some", "0", verdict(zero_loss)],
    ]
    report.table(
        "2. Delivered points/s end to end (counted at the receiver)",
        ["sender", "delivered points/s", "sender CPU s per 1M delivered",
         "delivered / sent (all runs)", "points refused by the rate ceiling", "lost"],
        rows,
        [f"{n:,} points per run ({n_influx:,} for influxdb-client, whose throughput would "
         f"make 1M take minutes), {rounds} round(s), peers interleaved in each round.",
         "The plexus receiver runs in its own process with rate_limit_interval=0.0005 "
         "(the real gateway's per-source ceiling), store=False, validate=False; the "
         "influxdb-client peer talks to a 204 server in its own process that counts lines.",
         "points/s = points counted at the receiver ÷ (arrival of the last stored request − "
         "the sender's first call). CPU = user+sys of the sender process over the sending "
         "and the final flush/close (import and set-up excluded).",
         "The SDK's plain px.send() costs one HTTP round trip per point, so it runs "
         "for a fixed 5 s (3 s in --quick) instead of the full count."],
    )
    report.table("2b. Throughput targets", ["ratio", "measured", "target", ""], targets)
    wire_rows = []
    for label, runs in data.items():
        wire = summary([r["wire"] for r in runs if r["wire"]])
        js = summary([r["json"] for r in runs if r["json"]])
        pts_req = sum(r["delivered"] for r in runs) / max(1, sum(r["requests"] for r in runs))
        wire_rows.append([label, fmt(wire["median"]), fmt(js["median"]), f"{pts_req:,.0f}"])
    report.table(
        "7. Bytes on the wire per point (gzip on), typical numeric stream",
        ["sender", "bytes/point on the wire", "bytes/point decoded", "points/request"],
        wire_rows,
        ["The stream: 10 metrics (rig.sensor_0..9), values a slow sine plus noise with 3 "
         "decimals, timestamps in ms, no tags. Body bytes of stored requests ÷ points stored.",
         "Ours gzips at level 1; the SDK at level 6 (and adds \"class\" to every point); "
         "the hand-rolled poster at level 1; influxdb-client sends line protocol, gzip."],
    )
    return {"median": med}


# 3. persistent buffer in/out --------------------------------------------------------


def bench_sqlite_io(report: Report, quick: bool) -> None:
    n = 200_000 if quick else 1_000_000
    runs = [run_worker("ours_worker.py", dict(mode="sqlite_io", bench=str(BENCH),
                                               tmp=tmpdir(), n=n))
            for _ in range(1 if quick else 3)]
    report.table(
        "3. Persistent buffer (SqliteBuffer), shipped crash-safety settings",
        ["", "points/s"],
        [["in (put, one producer thread, while the consumer drains)",
          fmt_summary(summary([r["in_rate"] for r in runs]), 0)],
         ["out (take 10,000 + ack, until all are acknowledged)",
          fmt_summary(summary([r["out_rate"] for r in runs]), 0)]],
        [f"{n:,} points per run, producer and consumer at once, no network: the buffer "
         "alone. sync_interval=1.0 s (fsync + move into SQLite every second), WAL, "
         "synchronous=NORMAL: a put() is on disk (in the kernel) before it returns."],
    )


# 4. CAN ---------------------------------------------------------------------------


def bench_can(report: Report, quick: bool) -> None:
    rows = []
    try:
        import importlib.util

        if importlib.util.find_spec("plexus.adapters.can") is None:
            raise ImportError("plexus.adapters.can is not there yet")
        with ReceiverProcess(rate_limit=RATE_LIMIT, cpu=1) as rx:
            replays = []
            for _ in range(1 if quick else 3):
                rx.clear()
                res = run_worker("can_worker.py", dict(mode="replay", url=rx.url, tmp=tmpdir(),
                                                       repeat=500 if quick else 2000))
                time.sleep(0.2)
                res["received"] = rx.stats()["count"]
                replays.append(res)
            fps = summary([r["fps"] for r in replays])
            ok = all(r["received"] == r["points"] and r["errors"] == 0 for r in replays)
            rows.append(["replay of a real capture through a real DBC, as fast as possible, "
                         "one core", f"{fmt_summary(fps, 0)} frames/s",
                         f"{fmt(summary([r['cpu_pct'] for r in replays])['median'], 0)}%",
                         "all delivered" if ok else "LOSS", "≥ 20,000 frames/s",
                         verdict(fps["median"] >= 20_000)])
            rx.clear()
            seconds = 3 if quick else 10
            res = run_worker("can_worker.py", dict(mode="virtual", url=rx.url, rate=8000,
                                                   seconds=seconds))
            time.sleep(0.2)
            received = rx.stats()["count"]
            zero = (res["frames"] == res["sent"] and res["errors"] == 0 and res["dropped"] == 0
                    and received == res["points"])
            rows.append([f"python-can virtual bus at 8,000 frames/s for {seconds} s",
                         f"{res['achieved_rate']:,.0f} frames/s sent, {res['frames']:,} of "
                         f"{res['sent']:,} read", f"{res['cpu_pct']:.0f}%",
                         f"{received:,} of {res['points']:,} points delivered",
                         "zero drops", verdict(zero)])
    except ImportError as exc:
        rows.append(["CAN", "pending", "-", str(exc), "", ""])
    report.table(
        "4. CAN adapter (plexus.adapters.can)",
        ["case", "rate", "CPU (% of one core)", "delivery", "target", ""],
        rows,
        ["Capture: plexus/data/msxii_battery_vt.log (36 real BATTERY_VT frames, multiplexed, "
         "3 signals each) repeated into a longer candump file with the same ids and "
         "payloads; DBC: plexus/data/msxii_system_can.dbc. The adapter's own replay mode "
         "(replay_speed 0) parses the file with python-can's LogReader, decodes with "
         "cantools and feeds the pipeline, HTTP sink included; the process is pinned to "
         "CPU 0 and the receiver to CPU 1.",
         "Virtual bus: a thread in the same process sends the same frames, paced; CPU % "
         "includes that sender thread. Zero drops = every frame read and decoded, no "
         "buffer overflow, every point counted at the receiver."],
    )


# 5. memory ------------------------------------------------------------------------


def bench_memory(report: Report, quick: bool) -> None:
    b = str(BENCH)
    base = summary([run_worker("ours_worker.py", dict(mode="empty"))["peak_rss_kb"]
                    for _ in range(3)])["median"]
    rows = []
    dead = f"http://127.0.0.1:{closed_port()}"
    for buf in ("memory", "persistent"):
        for n in (10_000, 1_000_000):
            res = run_worker("ours_worker.py", dict(mode="memory", url=dead, bench=b,
                                                    tmp=tmpdir(), buffer=buf, n=n))
            above = (res["peak_rss_kb"] - base) / 1024
            target, ok, extra = "", None, ""
            if n == 10_000 and buf == "memory":
                target, ok = "≤ 20 MB above", above <= 20
            if buf == "persistent" and n == 1_000_000:
                s = [kb for _, kb in res["samples"]]
                growth = (s[-1] - s[0]) / 1024
                extra = (f"; RSS at 10% / 50% / 100%: {s[0] / 1024:.0f} / "
                         f"{s[len(s) // 2 - 1] / 1024:.0f} / {s[-1] / 1024:.0f} MB")
                # Flat: 900,000 more points cost under 16 MB (about 18 bytes a
                # point); the memory buffer needs about 140 bytes a point.
                target, ok = "flat as it grows", growth <= 16
            rows.append([f"ours, {buf} buffer, {n:,} points buffered",
                         f"{res['peak_rss_kb'] / 1024:.1f}", f"{above:.1f}{extra}", target,
                         verdict(ok)])
    with ReceiverProcess(rate_limit=RATE_LIMIT) as rx:
        # (label, worker, buffer, cap, judged against the target?)
        cases = [
            ("ours, defaults (memory buffer of 10,000)", "ours", "memory", None, False),
            ("ours, memory buffer of 200,000 (no drops)", "ours", "memory", 200_000, False),
            ("ours, persistent buffer (no drops)", "ours", "persistent", None, True),
            ("SDK, defaults, px.batch() (persistent buffer)", "sdk", "persistent", None, False),
        ]
        for label, who, buffer, cap, judged in cases:
            rx.clear()
            args = dict(mode="burst", url=rx.url, bench=b, tmp=tmpdir(), n=200_000,
                        buffer=buffer, max_points=cap)
            if who == "ours":
                res = run_worker("ours_worker.py", args)
            else:
                res = run_worker("sdk_worker.py", args, env=sdk(rx))
            time.sleep(0.2)
            got = rx.stats()["count"]
            mb = res["peak_rss_kb"] / 1024
            rows.append([f"{label}: 200,000-point burst", f"{mb:.1f}",
                         f"{mb - base / 1024:.1f}; {got:,} delivered, "
                         f"{res['dropped']:,} dropped by the sender",
                         "≤ 40 MB peak, nothing dropped" if judged else "",
                         verdict(mb <= 40 and got == 200_000) if judged else "-"])
    report.table(
        "5. Memory (peak RSS, MB)",
        ["case", "peak RSS", "above an empty interpreter", "target", ""],
        rows,
        [f"Empty interpreter (python with json/resource imported): {base / 1024:.1f} MB "
         "peak RSS (VmHWM). Buffered runs point at a closed local port with no batch due, so "
         "everything stays in the buffer.",
         "Persistent buffer 'flat': RSS after 1,000,000 points at most 16 MB above RSS "
         "after 100,000 (the memory buffer grows by about 140 bytes a point, 120 MB).",
         "A burst: 200,000 send() calls as fast as possible against the live receiver; "
         "the peak RSS of the whole process. The target is judged on the configuration "
         "that delivers all 200,000 points with the least memory (the persistent buffer); "
         "the memory buffer keeps about 140 bytes a point in RAM."],
    )


# 6. start-up ----------------------------------------------------------------------


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


def bench_startup(report: Report, quick: bool) -> None:
    k = 5 if quick else 10
    ours = summary([run_worker("ours_worker.py", dict(mode="import"))["seconds"] * 1000
                    for _ in range(k)])
    with ReceiverProcess() as rx:
        theirs = summary([run_worker("sdk_worker.py", dict(mode="import"),
                                     env=sdk(rx))["seconds"] * 1000 for _ in range(k)])
    demo = ROOT / "configs" / "demo.yaml"
    note = "configs/demo.yaml"
    if not demo.exists():
        demo = BENCH / "rig_startup.yaml"
        note = "bench/rig_startup.yaml (configs/demo.yaml was missing)"
    first = summary([first_delivery(demo) * 1000 for _ in range(2 if quick else 5)])
    report.table(
        "6. Start-up",
        ["case", "ms", "target", ""],
        [["import plexus (ours)", fmt_summary(ours, 0), "≤ 150", verdict(ours["median"] <= 150)],
         ["import plexus (the SDK, for reference)", fmt_summary(theirs, 0), "", "-"],
         [f"plexus-gateway --config {note}: time to first delivered point",
          fmt_summary(first, 0), "", "-"]],
        [f"import: {k} fresh interpreters, time around the import statement alone.",
         "First delivery: from starting the process to the first 200 answer to POST /ingest "
         "of the in-process local receiver (local_receiver: enabled), read from the debug "
         "log. The demo's batch interval is 0.5 s, so most of this is that wait."],
    )


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke version")
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections: send throughput sqlite can memory startup")
    args = parser.parse_args()
    sections = {
        "send": bench_send_cost, "throughput": bench_throughput, "sqlite": bench_sqlite_io,
        "can": bench_can, "memory": bench_memory, "startup": bench_startup,
    }
    report = Report()
    t0 = time.time()
    head = (f"# plexus benchmarks{' (--quick)' if args.quick else ''}\n\n"
            f"- machine: {machine()}\n"
            f"- command: `bench/.venv/bin/python bench/run.py{' --quick' if args.quick else ''}`\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    print(head, flush=True)
    for name, func in sections.items():
        if args.only and name not in args.only:
            continue
        func(report, args.quick)
    elapsed = time.time() - t0
    md = report.markdown(head + f"- total run time: {elapsed:.0f} s\n")
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / ("latest-quick.md" if args.quick else "latest.md")).write_text(md + "\n")
    print(f"\ntotal {elapsed:.0f} s; written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
