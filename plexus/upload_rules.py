"""Upload rules of one sink: a byte budget, and metrics held while a condition holds.

A sink entry of a rig file may carry ``upload:``::

    sinks:
      - type: plexus
        upload:
          max_bytes_per_s: 20000          # body bytes on the wire, gzipped for plexus
          hold: ["camera.*", "lidar.*"]   # kept in the buffer while ...
          always: ["camera.alerts.*"]     # ... except these, which go at once
          hold_while: {default_route: wwan0}

What each part does, and where it lives:

- :class:`ByteBudget`: a token bucket on the bytes a sink reports sending
  (``Sink.record_sent``). The sink's uploader(s) wait for it before each
  request, so the budget holds whatever the sink is; a sink that never
  reports is charged an estimate.
- :class:`MetricRouter`: a sink with ``hold`` rules has two buffers (two
  "lanes"): points of held metrics go to the second one, whose uploader
  pauses while the condition holds. The router decides once per metric name
  (a dict lookup per point afterwards, never a glob match).
- The conditions and the thread that watches them: :mod:`plexus.conditions`.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from plexus.point import Point

#: The kinds of condition a hold rule can wait on (one per rule).
CONDITION_KINDS = ("file", "command", "interface_up", "default_route")
DEFAULT_EVERY = 1.0  # seconds between checks of a file, an interface or the routes
DEFAULT_COMMAND_EVERY = 10.0
_IFNAMSIZ = 16  # Linux interface names are at most 15 bytes


@dataclass
class ConditionSpec:
    """One condition of a hold rule: exactly one of ``file``, ``command``,
    ``interface_up``, ``default_route``."""

    file: str | None = field(
        default=None,
        metadata={"help": "true while this file exists (relative to the rig file)"},
    )
    command: str | None = field(
        default=None,
        metadata={"help": "true while this shell command exits 0 (run by /bin/sh, at most "
                          "every `every` seconds, never on the data path)"},
    )
    interface_up: str | None = field(
        default=None,
        metadata={"help": "true while this network interface is up (administratively up "
                          "and with a link)"},
    )
    default_route: str | None = field(
        default=None,
        metadata={"help": "true while the default route goes through this interface (the "
                          "IPv4 default route of lowest metric, else the IPv6 one)"},
    )
    every: float | None = field(
        default=None,
        metadata={"help": "seconds between checks. Default: 1, or 10 for a command",
                  "gt": 0},
    )
    timeout: float = field(
        default=5.0,
        metadata={"help": "command only: seconds before the command is killed; a check that "
                          "times out keeps the previous state", "gt": 0},
    )

    def __post_init__(self) -> None:
        given = [k for k in CONDITION_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            found = f" (got {', '.join(given)})" if given else ""
            raise ValueError(f"a condition needs exactly one of {', '.join(CONDITION_KINDS)}"
                             f"{found}")
        for kind in ("file", "command"):
            if getattr(self, kind) == "":
                raise ValueError(f"{kind} must not be empty")
        for kind in ("interface_up", "default_route"):
            name = getattr(self, kind)
            if name is not None and (not name or "/" in name or len(name.encode()) >= _IFNAMSIZ
                                     or name in (".", "..") or any(c.isspace() for c in name)):
                raise ValueError(f"{kind}: {name!r} is not a network interface name "
                                 "(1 to 15 characters, no '/' or spaces)")

    @property
    def kind(self) -> str:
        return next(k for k in CONDITION_KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> str:
        value = getattr(self, self.kind)
        assert isinstance(value, str)
        return value

    @property
    def interval(self) -> float:
        if self.every is not None:
            return self.every
        return DEFAULT_COMMAND_EVERY if self.kind == "command" else DEFAULT_EVERY

    def describe(self) -> str:
        """The condition in words, for logs: ``the default route is wwan0``."""
        return {
            "file": "{} exists",
            "command": "`{}` exits 0",
            "interface_up": "interface {} is up",
            "default_route": "the default route is {}",
        }[self.kind].format(self.target)


@dataclass
class UploadRules:
    """The ``upload:`` section of a sink entry (see docs/fleet.md, "Uploads that respect the link")."""

    max_bytes_per_s: int | None = field(
        default=None,
        metadata={"help": "Cap on the body bytes sent per second, averaged (a token bucket; "
                          "for plexus, the gzipped request bodies). Default: null, no cap.",
                  "ge": 1},
    )
    burst_bytes: int | None = field(
        default=None,
        metadata={"help": "Bytes that may go at once after a quiet spell (the bucket's size). "
                          "Default: null, one second's worth (max_bytes_per_s).",
                  "ge": 1},
    )
    hold: list[str] = field(
        default_factory=list,
        metadata={"help": "Metric patterns (shell-style: *, ?, [..]) kept in the buffer while "
                          "the hold condition is true, delivered when it clears. Needs "
                          "buffer: {type: sqlite}. Default: [], nothing held."},
    )
    always: list[str] = field(
        default_factory=list,
        metadata={"help": "Metric patterns never held, even when they match hold. "
                          "Default: []."},
    )
    hold_while: ConditionSpec | None = field(
        default=None,
        metadata={"help": "Hold while this condition is true (file, command, interface_up or "
                          "default_route). Default: null."},
    )
    hold_unless: ConditionSpec | None = field(
        default=None,
        metadata={"help": "Hold while this condition is false: the opposite of hold_while. "
                          "Default: null."},
    )

    def __post_init__(self) -> None:
        for name in ("hold", "always"):
            for pattern in getattr(self, name):
                if not pattern:
                    raise ValueError(f"{name}: a metric pattern must not be empty")
        if self.hold_while is not None and self.hold_unless is not None:
            raise ValueError("give hold_while or hold_unless, not both")
        if self.hold and self.condition is None:
            raise ValueError("hold needs a condition: hold_while or hold_unless")
        if self.condition is not None and not self.hold:
            raise ValueError("a hold condition needs the metrics to hold: add hold: [patterns]")
        if self.always and not self.hold:
            raise ValueError("always only makes exceptions to hold: add hold: [patterns]")
        if self.burst_bytes is not None and self.max_bytes_per_s is None:
            raise ValueError("burst_bytes needs max_bytes_per_s")

    @property
    def condition(self) -> ConditionSpec | None:
        return self.hold_while if self.hold_while is not None else self.hold_unless

    @property
    def holds_when_true(self) -> bool:
        """True for ``hold_while``, False for ``hold_unless``."""
        return self.hold_unless is None

    def describe_hold(self) -> str:
        """``camera.*, lidar.* while the default route is wwan0``."""
        condition = self.condition
        if condition is None:
            return "nothing"
        word = "while" if self.holds_when_true else "unless"
        return f"{', '.join(self.hold)} {word} {condition.describe()}"


# --------------------------------------------------------------------------
# Routing points between the two lanes of a sink


def compile_patterns(patterns: list[str]) -> Callable[[str], bool]:
    """One compiled matcher for shell-style patterns (``*`` matches dots too)."""
    if not patterns:
        return lambda metric: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda metric: regex.match(metric) is not None


class MetricRouter:
    """Send each point to the live or the held buffer of a sink, by its metric.

    The patterns are matched once per metric name; the answer is kept in a
    dict, so the hot path costs a lookup. The cache is bounded: a source
    that invents endless metric names (a counter in the name) only makes it
    start over.
    """

    MAX_CACHED = 65_536

    def __init__(
        self,
        hold: list[str],
        always: list[str],
        live_put: Callable[[Point], None],
        held_put: Callable[[Point], None],
        live_put_many: Callable[[list[Point]], None],
        held_put_many: Callable[[list[Point]], None],
    ) -> None:
        self._held = compile_patterns(hold)
        self._always = compile_patterns(always)
        self._live_put, self._held_put = live_put, held_put
        self._live_many, self._held_many = live_put_many, held_put_many
        self._routes: dict[str, Callable[[Point], None]] = {}

    def is_held(self, metric: str) -> bool:
        return self._held(metric) and not self._always(metric)

    def put(self, point: Point) -> None:
        put = self._routes.get(point[0])
        if put is None:
            put = self._learn(point[0])
        put(point)

    def _learn(self, metric: str) -> Callable[[Point], None]:
        put = self._held_put if self.is_held(metric) else self._live_put
        if len(self._routes) >= self.MAX_CACHED:
            self._routes.clear()
        self._routes[metric] = put
        return put

    def put_many(self, points: list[Point]) -> None:
        live: list[Point] = []
        held: list[Point] = []
        routes = self._routes
        for point in points:
            put = routes.get(point[0]) or self._learn(point[0])
            (held if put is self._held_put else live).append(point)
        if live:
            self._live_many(live)
        if held:
            self._held_many(held)


# --------------------------------------------------------------------------
# The byte budget


class ByteBudget:
    """A token bucket on bytes: ``rate`` a second on average, ``burst`` at once.

    Kept as a debt that drains at ``rate``: a request may start once the debt
    is at most ``burst`` minus what it is expected to send, and what it really
    sent is added afterwards. Over any window of T seconds the bytes sent stay
    within ``rate * T + max(burst, the largest single request)``; a request
    is never cut to fit, so one larger than ``burst`` goes when the debt is
    zero and the next one waits for it to drain.

    Shared by the uploaders of one sink (live and held lanes), which take
    turns (see ``Uploader``), so the budget is the sink's, not a lane's.
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if self.burst <= 0:
            raise ValueError("burst must be positive")
        self._clock = clock
        self._debt = 0.0
        self._stamp = clock()
        self._lock = threading.Lock()
        self.charged = 0  # bytes charged since start
        self.waited = 0.0  # seconds spent waiting for the budget

    def _drain(self, now: float) -> float:
        self._debt = max(0.0, self._debt - (now - self._stamp) * self.rate)
        self._stamp = now
        return self._debt

    def delay(self, expected: float = 0.0) -> float:
        """Seconds to wait before a request expected to send ``expected`` bytes."""
        with self._lock:
            debt = self._drain(self._clock())
            allowed = max(0.0, self.burst - expected)
            return max(0.0, (debt - allowed) / self.rate)

    def charge(self, nbytes: float) -> None:
        """Record ``nbytes`` sent."""
        if nbytes <= 0:
            return
        with self._lock:
            self._drain(self._clock())
            self._debt += nbytes
            self.charged += int(nbytes)
