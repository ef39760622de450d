"""Conditions of hold rules, and the gate that keeps a sink's held lane shut while one holds.

A condition is checked by a background thread (one per held lane), never on
the data path: a file's existence, a shell command's exit status, a
network interface's state, the interface of the default route. The held
lane's uploader only reads :attr:`HoldGate.holding`, a bool.

Linux is read directly: ``/sys/class/net/<if>/{flags,operstate}`` for an
interface, ``/proc/net/route`` and ``/proc/net/ipv6_route`` for the default
route. Both roots are parameters of :class:`ConditionCheck` (``sys_net``,
``proc_net``): a test that cannot create an interface can point them at
files it writes; the tests of this package use a veth pair in a private
network namespace instead where the machine allows it.

:meth:`HoldGate.set_override` is the seam for a remote command (or any code)
to force a hold on or off; ``None`` gives control back to the condition.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plexus.adapters.base import RateLimitedLog
from plexus.upload_rules import ConditionSpec, UploadRules

log = logging.getLogger("plexus.upload")

IFF_UP = 0x1
RTF_UP = 0x1
RTF_REJECT = 0x200
#: While holding, a held buffer this full (of its point or byte cap) draws a warning.
WARN_AT = 0.8
_WARN_EVERY = 60.0  # seconds between repeated "nearly full" warnings at the same level
_RATE_WINDOW = 60.0  # seconds of fill history behind the "time until full" estimate


class ConditionCheck:
    """Evaluate one :class:`ConditionSpec`: True, False, or None when it cannot tell.

    Parameters:
        spec: the condition.
        sys_net: where network interfaces are described (``/sys/class/net``).
        proc_net: where the routing tables are (``/proc/net``).
    """

    def __init__(self, spec: ConditionSpec, *, sys_net: str | os.PathLike[str] = "/sys/class/net",
                 proc_net: str | os.PathLike[str] = "/proc/net") -> None:
        self.spec = spec
        self.sys_net = Path(sys_net)
        self.proc_net = Path(proc_net)
        self._warn = RateLimitedLog(log, interval=300.0)

    def __call__(self) -> bool | None:
        kind = self.spec.kind
        if kind == "file":
            return os.path.exists(self.spec.target)
        if kind == "command":
            return self._command()
        if kind == "interface_up":
            return interface_is_up(self.spec.target, self.sys_net)
        return default_route_interface(self.proc_net) == self.spec.target

    def _command(self) -> bool | None:
        spec = self.spec
        try:
            # A session of its own, so a timeout kills what the shell started too.
            proc = subprocess.Popen(["/bin/sh", "-c", spec.target], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            self._warn(logging.WARNING, "hold condition: cannot run %r: %s", spec.target, exc)
            return None
        try:
            _, err = proc.communicate(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            self._warn(logging.WARNING, "hold condition: %r did not finish within %g s; "
                       "the hold stays as it was", spec.target, spec.timeout)
            return None
        if proc.returncode in (126, 127):
            # The shell could not find or run it: a typo would otherwise look like "false".
            self._warn(logging.WARNING, "hold condition: the shell could not run %r (exit %d: "
                       "%s)", spec.target, proc.returncode,
                       err.decode(errors="replace").strip()[:200])
        return proc.returncode == 0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.communicate()


def interface_is_up(name: str, sys_net: Path = Path("/sys/class/net")) -> bool:
    """Administratively up and with a link (operstate up, or unknown as for loopback)."""
    base = sys_net / name
    try:
        flags = int((base / "flags").read_text().strip(), 16)
        operstate = (base / "operstate").read_text().strip()
    except (OSError, ValueError):
        return False  # no such interface (unplugged modem, not yet created)
    return bool(flags & IFF_UP) and operstate in ("up", "unknown")


def default_route_interface(proc_net: Path = Path("/proc/net")) -> str | None:
    """The interface of the IPv4 default route of lowest metric, else of the IPv6 one."""
    best: tuple[int, str] | None = None
    try:
        lines = (proc_net / "route").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        f = line.split()
        try:
            iface, dest, flags, metric, mask = f[0], f[1], int(f[3], 16), int(f[6]), f[7]
        except (IndexError, ValueError):
            continue
        if dest == "00000000" and mask == "00000000" and flags & RTF_UP \
                and not flags & RTF_REJECT and (best is None or metric < best[0]):
            best = (metric, iface)
    if best is not None:
        return best[1]
    try:
        lines = (proc_net / "ipv6_route").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        try:
            dest, prefix, metric, flags, iface = f[0], f[1], int(f[5], 16), int(f[8], 16), f[9]
        except (IndexError, ValueError):
            continue
        if dest.strip("0") == "" and prefix == "00" and flags & RTF_UP \
                and not flags & RTF_REJECT and iface != "lo" \
                and (best is None or metric < best[0]):
            best = (metric, iface)
    return best[1] if best is not None else None


class HoldGate:
    """Whether the held lane of a sink may upload now; a thread keeps it current.

    Starts shut (holding) until the first check has answered, so nothing
    held slips out before the gateway knows the link. While holding it also
    watches the held buffer: when it passes ``warn_at`` of its cap, a warning
    says how long until the oldest held points would be dropped, at the rate
    the buffer grew over the last minute.

    Parameters:
        sink_name: for logs.
        rules: the sink's upload rules (the hold part is used).
        buffer: the held buffer, watched for its fill.
        check: evaluates the condition; default :class:`ConditionCheck` of the rules.
        tick: seconds between looks at the buffer (and the finest check interval).
    """

    def __init__(self, sink_name: str, rules: UploadRules, buffer: Any, *,
                 check: Callable[[], bool | None] | None = None, warn_at: float = WARN_AT,
                 tick: float = 1.0) -> None:
        spec = rules.condition
        if spec is None:
            raise ValueError("a HoldGate needs a rule with a condition")
        self.sink_name = sink_name
        self.rules = rules
        self.spec = spec
        self.buffer = buffer
        self.check = check or ConditionCheck(spec)
        self.warn_at = warn_at
        self.tick = tick
        self.holding = True  # read by the uploader; written by this gate only
        self.condition_true: bool | None = None  # the last answer of the check
        self.override: bool | None = None
        self.checks = 0
        self.last_change: float | None = None
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._fill: deque[tuple[float, int, int]] = deque()
        self._warned_at = 0.0
        self._warned_level = 0.0
        self._dropped_at_hold = 0  # the buffer's drop count when the hold began
        self._drops_seen = 0
        self._drops_reported_at = -_WARN_EVERY

    # The uploader's side -------------------------------------------------
    def is_open(self) -> bool:
        return not self.holding

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the gate's thread) each time the hold clears."""
        self._listeners.append(callback)

    # Control ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"plexus-hold:{self.sink_name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(self.spec.timeout + 2.0)

    def set_override(self, holding: bool | None) -> None:
        """Force the hold on (True) or off (False), or give it back to the condition (None).

        The seam for a remote command; takes effect at once.
        """
        with self._lock:
            self.override = holding
            self._update("override" if holding is not None else "override removed")

    def status(self) -> dict[str, Any]:
        return {"holding": self.holding, "rule": self.rules.describe_hold(),
                "condition_true": self.condition_true, "override": self.override}

    # The thread --------------------------------------------------------------
    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_check:
                self._evaluate()
                next_check = time.monotonic() + self.spec.interval
            try:
                self._watch_fill()
            except Exception:  # a closed or failing buffer must not end the gate
                log.debug("watching the held buffer of %s failed", self.sink_name, exc_info=True)
            self._poke.wait(max(0.0, min(self.tick, next_check - time.monotonic())))
            self._poke.clear()

    def _evaluate(self) -> None:
        try:
            answer = self.check()
        except Exception as exc:  # a check must never end the gate
            log.warning("sink %s: checking the hold condition (%s) failed: %s",
                        self.sink_name, self.spec.describe(), exc)
            answer = None
        self.checks += 1
        with self._lock:
            if answer is not None:
                self.condition_true = answer
            self._update("condition")

    def _update(self, why: str) -> None:
        """Recompute ``holding``; the caller holds the lock."""
        if self.override is not None:
            holding = self.override
        elif self.condition_true is None:
            return  # no answer yet (or none since the override went): stay as we are
        else:
            holding = self.condition_true == self.rules.holds_when_true
        first = self.last_change is None
        if holding == self.holding and not first:
            return
        was_holding, self.holding = self.holding, holding
        self.last_change = time.monotonic()
        forced = " (forced by a remote override)" if why == "override" else ""
        if holding:
            if first or not was_holding:
                self._dropped_at_hold = self._drops_seen = self.buffer.dropped
                self._fill.clear()
                log.info("sink %s: holding %s%s; %d points wait in the held buffer",
                         self.sink_name, self.rules.describe_hold(), forced, len(self.buffer))
            return
        log.info("sink %s: %s%s; delivering %d held points", self.sink_name,
                 "not holding" if first else "hold cleared", forced, len(self.buffer))
        for callback in self._listeners:
            callback()

    # Nearly full while holding -------------------------------------------------
    def _watch_fill(self) -> None:
        if not self.holding:
            return
        buffer = self.buffer
        now = time.monotonic()
        points = len(buffer)
        nbytes = int(getattr(buffer, "stored_bytes", 0) or 0)
        fill = self._fill
        fill.append((now, points, nbytes))
        while len(fill) > 2 and now - fill[0][0] > _RATE_WINDOW:
            fill.popleft()
        if buffer.dropped > self._drops_seen and now - self._drops_reported_at >= _WARN_EVERY:
            self._drops_seen = buffer.dropped
            self._drops_reported_at = now
            log.error("sink %s: the held buffer is full: %d of the oldest held points were "
                      "dropped since the hold began (%s). Raise buffer.max_bytes or "
                      "buffer.max_points, narrow hold, or clear the condition",
                      self.sink_name, buffer.dropped - self._dropped_at_hold,
                      self.rules.describe_hold())
        max_points = buffer.max_points
        max_bytes = getattr(buffer, "max_bytes", None)
        level = points / max_points
        if max_bytes:
            level = max(level, nbytes / max_bytes)
        if level < self.warn_at:
            self._warned_level = 0.0
            return
        step = int(level * 20) / 20  # warn again at each further 5%
        if step <= self._warned_level and now - self._warned_at < _WARN_EVERY:
            return
        self._warned_at, self._warned_level = now, step
        log.warning("sink %s: holding %s, the held buffer is %d%% full (%s); %s",
                    self.sink_name, self.rules.describe_hold(), int(level * 100),
                    _amounts(points, max_points, nbytes, max_bytes),
                    self._time_left(points, max_points, nbytes, max_bytes))

    def _time_left(self, points: int, max_points: int, nbytes: int,
                   max_bytes: int | None) -> str:
        fill = self._fill
        t0, p0, b0 = fill[0]
        t1 = fill[-1][0]
        if t1 - t0 < 1.0:
            return "its growth rate is not known yet"
        etas = []
        point_rate = (points - p0) / (t1 - t0)
        if point_rate > 0:
            etas.append((max_points - points) / point_rate)
        byte_rate = (nbytes - b0) / (t1 - t0)
        if max_bytes and byte_rate > 0:
            etas.append((max_bytes - nbytes) / byte_rate)
        if not etas:
            return "it is not growing now"
        eta = max(0.0, min(etas))
        return (f"at the current rate ({point_rate:,.0f} points/s) the oldest held points "
                f"will be dropped in about {_duration(eta)}")


def _amounts(points: int, max_points: int, nbytes: int, max_bytes: int | None) -> str:
    text = f"{points:,} of {max_points:,} points"
    if max_bytes:
        text += f", {nbytes / 1e6:,.1f} of {max_bytes / 1e6:,.1f} MB"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
