"""What "healthy" means, for the systemd watchdog and for ``/healthz``.

Two questions, two answers:

- **Is this process working?** (:func:`stuck`) Would a restart help? Yes
  when an uploader thread has died, or a request has been on the wire far
  beyond the sink's timeout (the sink is wedged: its thread will never
  deliver again). The main loop pings the watchdog only while nothing is
  stuck, and a dead main loop pings nothing, so in both cases systemd
  restarts the gateway. A platform that is down is *not* stuck: a restart
  would not bring it back, and the points are safe in the buffer.
- **Is it doing its job?** (:func:`problems`, ``/healthz``) Everything
  above, plus what a person should look at: an adapter that failed for
  good, a key the platform refuses, a sink that has delivered nothing for
  ``stale_after`` seconds while points wait, a main loop that has not
  ticked for a while.
"""

from __future__ import annotations

from plexus.service.figures import Snapshot

__all__ = ["problems", "stuck"]

#: Default seconds without a delivery (while points wait) before /healthz says so.
DEFAULT_STALE_AFTER = 300.0


def stuck(snapshot: Snapshot) -> list[str]:
    """What a restart would fix: a dead uploader thread, a wedged request."""
    reasons = []
    for sink in snapshot.sinks:
        if not sink.uploader_alive:
            reasons.append(f"sink {sink.name}: its uploader thread is not running")
        elif sink.wedged:
            reasons.append(f"sink {sink.name}: a request has been on the wire for "
                           f"{sink.sending_for:.0f} s (wedged after {sink.wedged_after:.0f} s)")
    return reasons


def problems(snapshot: Snapshot, *, stale_after: float = DEFAULT_STALE_AFTER,
             loop_stalled_after: float | None = None) -> list[str]:
    """Every reason the gateway is not doing its job; empty when it is."""
    reasons = stuck(snapshot)
    tick_age = snapshot.service.get("main_loop_age")
    if loop_stalled_after is not None and tick_age is not None and tick_age > loop_stalled_after:
        reasons.append(f"the main loop has not run for {tick_age:.0f} s")
    for adapter in snapshot.adapters:
        if adapter.state == "failed":
            reasons.append(f"adapter {adapter.name}: failed: {adapter.last_error or 'no reason'}")
    now = snapshot.taken_at
    for sink in snapshot.sinks:
        if sink.opening:
            reasons.append(f"sink {sink.name}: cannot open yet: {sink.open_error or 'retrying'}")
            continue
        if sink.auth_refused:
            reasons.append(f"sink {sink.name}: the platform refuses the API key")
            continue
        if sink.buffered <= 0 or sink.delivering and sink.upload_lag < stale_after:
            continue
        age = sink.last_success_age(now)
        since = age if age is not None else snapshot.uptime
        if since >= stale_after:
            reasons.append(f"sink {sink.name}: nothing delivered for {since:.0f} s, "
                           f"{sink.buffered} points waiting"
                           + (f" (last error: {sink.last_error})" if sink.last_error else ""))
    return reasons
