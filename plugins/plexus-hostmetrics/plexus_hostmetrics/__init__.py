"""plexus-hostmetrics: the host's own health as a plexus source.

Reads Linux's /proc and /sys directly (no psutil), so it costs nothing to
install on a vehicle computer. Metrics, with the default prefix ``host``:

- ``host.cpu.percent``: busy share of all CPUs since the previous reading (0..100)
- ``host.load.1m``, ``host.load.5m``, ``host.load.15m``: load averages
- ``host.memory.used_percent``, ``host.memory.available_bytes``
- ``host.disk.used_percent`` and ``host.disk.free_bytes``, tagged ``mount=<path>``
- ``host.temperature.celsius``, tagged ``zone=<thermal zone type>`` (where the
  kernel exposes thermal zones; containers often do not)
- ``host.uptime_seconds``

The ``history`` sink (:mod:`plexus_hostmetrics.history`) keeps the last
hours of points in a local SQLite file, for a look at the machine itself.

It also adds a remote command, ``host_report``: read the host now (every
``hostmetrics`` adapter of the rig sends a fresh set of points) and answer
with load, memory and uptime, so the dashboard can ask "how is the computer
doing?" without waiting for the next interval.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from plexus import OptionsModel, ThreadedAdapter, hookimpl, option
from plexus.commands import command
from plexus_hostmetrics.history import HistorySink

__version__ = "0.1.0"


class HostMetricsOptions(OptionsModel):
    """Options of the ``hostmetrics`` adapter.

    A pydantic model: the limits (``gt``, ``min_length``) are checked when the
    rig file loads, shown by ``plexus-gateway options hostmetrics`` and written
    into ``plexus-gateway schema``.
    """

    interval: float = option(5.0, help="seconds between readings", gt=0)
    prefix: str = option("host", help="metric name prefix", min_length=1)
    disks: list[str] = option(default_factory=lambda: ["/"],
                              help="mount points whose usage is reported")
    temperature: bool = option(True, help="report /sys/class/thermal zones")
    proc: str = option("/proc", help="where procfs is mounted")
    sys: str = option("/sys", help="where sysfs is mounted")


def read_cpu_times(proc: Path) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = (proc / "stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def read_meminfo(proc: Path) -> dict[str, int]:
    info = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return info


def read_temperatures(sys_root: Path) -> list[tuple[str, float]]:
    out = []
    for zone in sorted((sys_root / "class" / "thermal").glob("thermal_zone*")):
        try:
            millideg = int((zone / "temp").read_text().strip())
            kind = (zone / "type").read_text().strip() or zone.name
        except (OSError, ValueError):
            continue  # a zone that cannot be read right now is skipped, not an error
        out.append((kind, millideg / 1000.0))
    return out


class HostMetricsAdapter(ThreadedAdapter):
    """Report CPU, memory, disk, load, temperature and uptime every ``interval`` seconds."""

    type_name = "hostmetrics"
    Options = HostMetricsOptions

    def __init__(self, options: HostMetricsOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self._proc = Path(options.proc)
        self._sys = Path(options.sys)
        self._last_cpu: tuple[int, int] | None = None

    def connect(self) -> None:
        if not (self._proc / "stat").exists():
            raise OSError(f"{self._proc}/stat not found: hostmetrics needs Linux procfs")

    def run_connected(self) -> None:
        while not self.stopping.is_set():
            self.read_once()
            self.stopping.wait(self.options.interval)

    def read_once(self) -> None:
        p = self.options.prefix
        try:
            busy, total = read_cpu_times(self._proc)
            if self._last_cpu is not None and total > self._last_cpu[1]:
                share = (busy - self._last_cpu[0]) / (total - self._last_cpu[1])
                self.emit(f"{p}.cpu.percent", round(100.0 * share, 2))
            self._last_cpu = (busy, total)

            load = (self._proc / "loadavg").read_text().split()
            for label, value in zip(("1m", "5m", "15m"), load[:3], strict=True):
                self.emit(f"{p}.load.{label}", float(value))

            mem = read_meminfo(self._proc)
            if mem.get("MemTotal"):
                available = mem.get("MemAvailable", mem.get("MemFree", 0))
                self.emit(f"{p}.memory.available_bytes", available)
                self.emit(f"{p}.memory.used_percent",
                          round(100.0 * (1 - available / mem["MemTotal"]), 2))

            uptime = float((self._proc / "uptime").read_text().split()[0])
            self.emit(f"{p}.uptime_seconds", uptime)
        except (OSError, ValueError, IndexError) as exc:
            self.record_error(exc)

        for mount in self.options.disks:
            try:
                st = os.statvfs(mount)
            except OSError as exc:
                self.bad_input(f"disk {mount}: {exc}")
                continue
            size = st.f_blocks * st.f_frsize
            if size:
                free = st.f_bavail * st.f_frsize
                tags = {"mount": mount}
                self.emit(f"{p}.disk.free_bytes", free, tags=tags)
                self.emit(f"{p}.disk.used_percent", round(100.0 * (1 - free / size), 2), tags=tags)

        if self.options.temperature:
            for zone, celsius in read_temperatures(self._sys):
                self.emit(f"{p}.temperature.celsius", celsius, tags={"zone": zone})

    def health_extra(self) -> dict[str, Any]:
        return {"interval": self.options.interval}


@hookimpl
def plexus_register_adapters(register: Any) -> None:
    register(HostMetricsAdapter)


@hookimpl
def plexus_register_sinks(register: Any) -> None:
    register(HistorySink)


@hookimpl
def plexus_register_commands(register: Any, control: Any) -> None:
    @command("host_report", title="Host report",
             description="Read the host now and answer with load, memory and uptime",
             params={"proc": {"type": "string", "default": "/proc",
                              "description": "where procfs is mounted"}})
    def host_report(run: Any, proc: str) -> dict[str, Any]:
        for adapter in control.adapters("hostmetrics"):
            if adapter.state == "connected":
                adapter.read_once()  # fresh points, through the gateway's pipeline
        root = Path(proc)
        mem = read_meminfo(root)
        load = (root / "loadavg").read_text().split()
        return {
            "load_1m": float(load[0]),
            "memory_available_bytes": mem.get("MemAvailable", mem.get("MemFree", 0)),
            "uptime_seconds": float((root / "uptime").read_text().split()[0]),
        }

    register(host_report)
