"""How a running gateway shows itself: a live table on a terminal, status lines elsewhere.

On a TTY (and with text logs) a rich table is redrawn every second: per
adapter its state, points/s, totals, errors and its own counters; per sink
what is buffered, delivered (and at what rate), dropped, rejected, and how
long since the last upload. The log lines go to a pane below the table, so
the two never overwrite each other. Anywhere else (a pipe, journald,
``--log-format json``) a status line is logged every ``status_interval``
seconds instead, with the same figures. rich is imported only here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any

log = logging.getLogger("plexus.cli")

__all__ = ["LineStatus", "LiveStatus", "make_status_view", "summary"]


def details(extra: dict[str, Any]) -> str:
    """An adapter's non-zero counters (error frames, bad CRCs, reconnects...), compact."""
    return " ".join(f"{k}={v}" for k, v in extra.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v)


class Rates:
    """Points per second of each adapter and sink, between two looks."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def rate(self, key: str, total: int) -> float:
        now = time.monotonic()
        then, before = self._last.get(key, (now, total))
        self._last[key] = (now, total)
        return (total - before) / (now - then) if now > then else 0.0

    def all(self, status: dict[str, Any]) -> dict[str, float]:
        rates = {f"a:{a['name']}": self.rate(f"a:{a['name']}", a["points"])
                 for a in status["adapters"]}
        rates.update({f"s:{s['name']}": self.rate(f"s:{s['name']}", s["delivered"])
                      for s in status["sinks"]})
        return rates


def link_line(link: dict[str, Any]) -> str:
    """The device link's state and the last command, for the status view."""
    text = f"link {link['state']}"
    if link.get("state") == "up" and link.get("since"):
        text += f" {time.time() - link['since']:.0f}s"
    elif link.get("last_error"):
        text += f" ({link['last_error'][:60]})"
    last = link.get("last_command")
    if last:
        text += (f"; last command {last['command']} {last['outcome']} "
                 f"{time.time() - last['at']:.0f}s ago")
    return text


def upload_line(sink: dict[str, Any]) -> str:
    """A sink's upload rules at work: held points and the hold, bytes against the budget."""
    parts = []
    if "held" in sink:
        state = "HOLDING" if sink["holding"] else "not holding"
        parts.append(f"held {sink['held']} ({state}: {sink['hold_rule']})")
    if "max_bytes_per_s" in sink:
        parts.append(f"sent {sink['bytes_sent']:,} bytes (cap {sink['max_bytes_per_s']:,}/s)")
    return "  ".join(parts)


def summary(status: dict[str, Any], rates: dict[str, float] | None = None) -> str:
    """One line: each adapter's state, points/s and totals; each sink's delivery."""
    rates = rates or {}
    parts = []
    for a in status["adapters"]:
        rate = rates.get(f"a:{a['name']}")
        text = f"{a['name']} {a['state']}"
        if rate is not None:
            text += f" {rate:.1f} pts/s"
        text += f" ({a['points']} points, {a['errors']} errors"
        extra = details(a["details"])
        text += f", {extra})" if extra else ")"
        parts.append(text)
    sinks = []
    for s in status["sinks"]:
        rate = rates.get(f"s:{s['name']}")
        text = f"sink {s['name']}"
        if s.get("state") == "opening":  # isolated: retried while the others deliver
            text += f" not open ({s['last_error']})"
        if rate is not None:
            text += f" {rate:.1f} pts/s"
        text += (f" (delivered {s['delivered']}, buffered {s['buffered']}, dropped "
                 f"{s['dropped']}, rejected {s['rejected']}")
        upload = upload_line(s)
        text += f"; {upload})" if upload else ")"
        sinks.append(text)
    if status.get("link"):
        sinks.append(link_line(status["link"]))
    return "; ".join(parts + sinks)


class LineStatus:
    """A status log line every ``interval`` seconds (not a TTY, or JSON logs)."""

    def __init__(self, gateway: Any, interval: float, enabled: bool = True) -> None:
        self.gateway = gateway
        self.interval = interval
        self.enabled = enabled
        self.tick_seconds = max(0.2, min(interval, 1.0))
        self._next = time.monotonic() + interval
        self._rates = Rates()
        self._rates.all(gateway.status())  # the starting point of the first rates

    def tick(self) -> None:
        if not self.enabled or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval
        status = self.gateway.status()
        log.info("status: %s", summary(status, self._rates.all(status)),
                 extra={"status": status})

    def close(self) -> None:
        pass

    def final(self) -> None:
        status = self.gateway.status()
        log.info("stopped after %.0f s: %s", status["uptime"], summary(status),
                 extra={"status": status})
        print_receiver_summary(self.gateway)


class _PaneHandler(logging.Handler):
    """Keeps the last log lines for the pane under the live table."""

    def __init__(self, lines: deque[str]) -> None:
        super().__init__()
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                            datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never stop the gateway
            self.handleError(record)


class LiveStatus:
    """A rich table redrawn every second, with the log in a pane below it (a TTY)."""

    tick_seconds = 1.0

    def __init__(self, gateway: Any, log_lines: int = 8) -> None:
        from rich.console import Console
        from rich.live import Live

        self.gateway = gateway
        self._rates = Rates()
        self._rates.all(gateway.status())
        self._lines: deque[str] = deque(maxlen=log_lines)
        self._handler = _PaneHandler(self._lines)
        root = logging.getLogger()
        self._saved = list(root.handlers)
        for handler in self._saved:
            root.removeHandler(handler)
        root.addHandler(self._handler)
        self._console = Console()
        self._live = Live(self.render(), console=self._console, refresh_per_second=2,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        status = self.gateway.status()
        rates = self._rates.all(status)
        title = (f"plexus-gateway  source {status['source_id']}  session "
                 f"{status['session'] or '-'}  up {status['uptime']:.0f} s")
        adapters = Table(title=title, title_justify="left", expand=True)
        for column in ("adapter", "type", "state"):
            adapters.add_column(column)
        for column in ("pts/s", "points", "errors"):
            adapters.add_column(column, justify="right")
        adapters.add_column("counters / last error", overflow="fold")
        for a in status["adapters"]:
            note = details(a["details"])
            if a["last_error"]:
                note = (note + "\n" if note else "") + f"[red]{a['last_error']}[/red]"
            state = a["state"]
            style = {"connected": "green", "failed": "red", "reconnecting": "yellow",
                     "link_lost": "yellow"}.get(state, "")
            rate = rates["a:" + a["name"]]
            adapters.add_row(a["name"], a["type"], f"[{style}]{state}[/{style}]" if style
                             else state, f"{rate:.1f}", str(a["points"]), str(a["errors"]), note)
        sinks = Table(expand=True)
        sinks.add_column("sink")
        for column in ("pts/s", "delivered", "buffered", "dropped", "rejected", "lag (s)"):
            sinks.add_column(column, justify="right")
        sinks.add_column("upload rules / last error", overflow="fold")
        for s in status["sinks"]:
            lag = "-" if s["since_last_upload"] is None else f"{s['since_last_upload']:.1f}"
            rate = rates["s:" + s["name"]]
            note = upload_line(s)
            if s["last_error"]:
                note = (note + "\n" if note else "") + f"[red]{s['last_error']}[/red]"
            sinks.add_row(s["name"], f"{rate:.1f}", str(s["delivered"]),
                          str(s["buffered"]), str(s["dropped"]), str(s["rejected"]), lag, note)
        link = Text(link_line(status["link"])) if status.get("link") else Text("")
        pane = Panel(Text("\n".join(self._lines) or "(no log lines yet)", no_wrap=False),
                     title="log", title_align="left", height=len(self._lines) + 2
                     if self._lines else 3)
        return Group(adapters, sinks, link, pane) if status.get("link") else \
            Group(adapters, sinks, pane)

    def tick(self) -> None:
        self._live.update(self.render())

    def close(self) -> None:
        self._live.update(self.render())
        self._live.stop()
        root = logging.getLogger()
        root.removeHandler(self._handler)
        for handler in self._saved:
            root.addHandler(handler)

    def final(self) -> None:
        status = self.gateway.status()
        log.info("stopped after %.0f s: %s", status["uptime"], summary(status),
                 extra={"status": status})
        print_receiver_summary(self.gateway)


def make_status_view(gateway: Any, interval: float, *, enabled: bool = True,
                     live: bool = True) -> LineStatus | LiveStatus:
    """The live table on a terminal, status lines otherwise."""
    if enabled and live and sys.stdout.isatty() and sys.stderr.isatty():
        try:
            return LiveStatus(gateway)
        except ImportError:  # rich is a dependency; a broken install falls back
            pass
    return LineStatus(gateway, interval, enabled)


def print_receiver_summary(gateway: Any) -> None:
    """What the bundled local receiver stored, grouped by metric prefix (the demo)."""
    receiver = gateway.receiver
    if receiver is None:
        return
    metrics = receiver.metrics()
    groups: dict[str, list[str]] = {}
    for name in metrics:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    print(f"\nlocal receiver stored {receiver.count} points in {len(metrics)} metrics:")
    for group, names in sorted(groups.items()):
        points = sum(len(metrics[n]) for n in names)
        sample = sorted(names)[0]
        print(f"  {group + '.*':<32} {points:>7} points in {len(names):>3} metrics, "
              f"e.g. {sample} = {metrics[sample][-1]!r}")
