"""A long outage with the memory buffer: bounded memory, drop-oldest with an exact count.

The sender runs in a subprocess so its peak RSS (VmHWM) is its own. It sends
while the receiver is down, reports what it measured, waits until the test
has brought the receiver back, then flushes; the test counts at the receiver.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reliability.conftest import record_figure
from tests.reliability.support import child_env, values

SENDER = r"""
import json, sys
from plexus import Plexus, RetryPolicy

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

url, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
px = Plexus(api_key="plx_test", source_id="rig-01", gateway_url=url, max_buffer_points=cap,
            flush_interval=0.05, retry=RetryPolicy(retries=1, base=0.01, max_delay=0.05))
base = hwm_kb()
tags = {"rig": "a", "unit": "rpm"}
for i in range(n):
    px.send("motor.rpm", i, tags=tags)
print(json.dumps({"hwm_before_kb": base, "hwm_after_kb": hwm_kb(), "dropped": px.dropped,
                  "buffered": px.buffer_size()}), flush=True)
sys.stdin.readline()  # the receiver is back
px.flush_buffer(timeout=60)
px.close()
print(json.dumps({"delivered": px.stats.delivered}), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_long_outage_with_the_memory_buffer_stays_bounded(plexus_receiver, slow):
    sent = 3_000_000 if slow else 400_000
    cap = 10_000  # the default
    plexus_receiver.go_down()
    proc = subprocess.Popen([sys.executable, "-c", SENDER, plexus_receiver.url, str(sent),
                             str(cap)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=child_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        measured = json.loads(proc.stdout.readline())
        plexus_receiver.come_up()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        done = json.loads(proc.stdout.readline())
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert measured["buffered"] == cap
    assert measured["dropped"] == sent - cap  # exact: every dropped point is counted
    stored = values(plexus_receiver)
    assert len(stored) == cap == done["delivered"]
    assert len(set(stored)) == cap
    # The oldest are dropped: what arrives is the batch in flight when the outage
    # began plus the newest points.
    newest = sorted(stored)[-1]
    assert newest == sent - 1
    peak_mb = measured["hwm_after_kb"] / 1024
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"  # generous: a bound, not a speed
    record_figure("memory buffer outage RSS", {
        "sent": sent, "cap": cap, "dropped": measured["dropped"], "delivered": len(stored),
        "peak_rss_before_sending_mb": round(measured["hwm_before_kb"] / 1024, 1),
        "peak_rss_after_sending_mb": round(peak_mb, 1)})
