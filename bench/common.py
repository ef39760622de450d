"""Shared helpers of the bench scripts: subprocess runs, receivers, statistics.

Nothing here imports ``plexus``: the official SDK is also imported as
``plexus``, so every measurement runs in its own subprocess and only the
worker scripts import one or the other.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
SDK_PATH = BENCH / ".venv" / "sdk"

# Ten metric names and a table of realistic readings (a slow sine plus sensor
# noise, 3 decimals), shared by every sender so the bytes on the wire compare.
METRICS = [f"rig.sensor_{i}" for i in range(10)]


def values_table(n: int = 10_000, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [round(20.0 + 5.0 * math.sin(i * 0.01) + rng.gauss(0.0, 0.1), 3) for i in range(n)]


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a worker: no proxies (everything stays on 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy",
                                "wss_proxy", "pythonpath")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def sdk_env(home: str, gateway_url: str, closed_port: int) -> dict[str, str]:
    """The official SDK pointed at the local receiver, its WebSocket and app API
    at a closed local port, quiet, with an isolated HOME, imported from
    bench/.venv/sdk (it shares the import name ``plexus`` with this project)."""
    return clean_env(
        HOME=home,
        PYTHONPATH=str(SDK_PATH),
        PLEXUS_GATEWAY_URL=gateway_url,
        PLEXUS_GATEWAY_WS_URL=f"ws://127.0.0.1:{closed_port}",
        PLEXUS_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        PLEXUS_API_KEY="plx_test",
        PLEXUS_QUIET="1",
    )


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_worker(script: str, args: dict[str, Any], env: dict[str, str] | None = None,
               timeout: float = 600.0, cwd: str | None = None) -> dict[str, Any]:
    """Run ``bench/<script>`` with JSON args; its last stdout line is its JSON result."""
    proc = subprocess.run(
        [PYTHON, str(BENCH / script), json.dumps(args)],
        capture_output=True, text=True, timeout=timeout,
        env=env or clean_env(HOME=tempfile.mkdtemp(prefix="plexus-bench-home-")),
        cwd=cwd or tempfile.gettempdir(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {args} failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


class ReceiverProcess:
    """A receiver in its own process (so its CPU is not the sender's).

    kind "plexus": plexus.testing.Receiver (store=False); kind "influx": the
    tiny 204 server of influx_receiver.py. Both answer ``stats``/``clear`` on
    stdin with one JSON line.
    """

    def __init__(self, kind: str = "plexus", rate_limit: float | None = 0.0005,
                 validate: bool = False, cpu: int | None = None, store: bool = False) -> None:
        args = {"kind": kind, "rate_limit": rate_limit, "validate": validate, "cpu": cpu,
                "store": store}
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / "receiver_proc.py"), json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=clean_env(), cwd=tempfile.gettempdir(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def clear(self) -> dict[str, Any]:
        return self._ask("clear")

    def ask(self, command: str) -> dict[str, Any]:
        """Any other command receiver_proc.py answers (down, up, timeline, stored)."""
        return self._ask(command)

    def close(self) -> None:
        try:
            self._ask("quit")
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def fmt_summary(s: dict[str, float], digits: int = 2) -> str:
    if not s.get("n"):
        return "-"
    if s["n"] == 1:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)} / {fmt(s['max'], digits)})"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_kb() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child
    # of a big parent would report the parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
