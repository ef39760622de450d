"""The systemd notify protocol: one datagram per message to ``$NOTIFY_SOCKET``.

A ``Type=notify`` unit is "started" when the service says ``READY=1``; with
``WatchdogSec=`` systemd kills (and, with ``Restart=on-failure``, restarts) a
service that stops sending ``WATCHDOG=1``. The protocol is a line of
``KEY=value`` pairs in a Unix datagram, so it is written here in a few lines
rather than taken from a library (sdnotify does the same, no more).

Outside systemd (no ``NOTIFY_SOCKET``) every method does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

#: systemd shows a status line in ``systemctl status``; longer ones are cut.
MAX_STATUS_CHARS = 200


class Notifier:
    """Tell systemd how the service is doing.

    Parameters:
        address: the socket: a path, or ``@name`` for an abstract socket; None
            disables every message.
        watchdog_usec: ``$WATCHDOG_USEC``: systemd wants a ping at least this
            often (microseconds); None when the unit has no ``WatchdogSec=``.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *,
                     unset: bool = True) -> Notifier:
        """The notifier systemd set up for this process (a disabled one outside it).

        ``unset`` removes the variables from ``os.environ``, so a program an
        adapter starts does not talk to systemd in our name.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog = int(usec) if int(usec) > 0 else None
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket; not notifying systemd", address)
            address = None
        if unset and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of what systemd allows, as it advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    # Messages --------------------------------------------------------------
    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete."""
        self.send("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> None:
        """A reload begins; ``ready()`` ends it. MONOTONIC_USEC lets systemd 253+
        match it to the ``systemctl reload`` that asked."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *self._status(status))

    def status(self, text: str) -> None:
        self.send(*self._status(text))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd gives up on a start or stop
        (the shutdown's grace period, spent delivering what is buffered)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        """Ping the watchdog now. Call only while the service is healthy."""
        self._last_ping = time.monotonic()
        self.send("WATCHDOG=1")

    def watchdog_due(self) -> bool:
        """True when a ping is due (always False without a watchdog)."""
        interval = self.watchdog_interval
        return interval is not None and time.monotonic() - self._last_ping >= interval

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one message; True when it was sent. Never raises:
        a systemd that cannot be told must not stop the gateway."""
        if self.address is None or not fields:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, target)
        except OSError as exc:
            if not self._failed:  # once: the socket stays gone until a restart
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if not text:
            return ()
        line = " ".join(text.split())  # one line: a newline would end the field
        if len(line) > MAX_STATUS_CHARS:
            line = line[:MAX_STATUS_CHARS - 3] + "..."
        return (f"STATUS={line}",)
