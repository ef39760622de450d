"""A scripted MAVLink sender, run as its own process by tests/adapters/test_mavlink.py.

Usage::

    python mavlink_sender.py --port 14550 --steps '[...]'

``--steps`` is a JSON list run in order; each step is one of::

    {"msg": "ATTITUDE", "fields": {"roll": 0.1}, "count": 1, "interval": 0.0,
     "system": 1, "component": 1, "mavlink1": false, "corrupt": false}
        send a message (fields left out are zero); "corrupt" flips one payload
        byte after packing, so the receiver sees a bad CRC
    {"noise": 64, "seed": 1}  send that many random bytes as one datagram
    {"skip_seq": 3}      advance the sequence number without sending
    {"sleep": 0.2}       pause

Packets go to udpout:127.0.0.1:<port>. The process exits when the steps end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

os.environ["MAVLINK20"] = "1"  # before pymavlink picks its dialect modules

from pymavlink import mavutil  # noqa: E402


def _message(mav_module: Any, name: str, fields: dict[str, Any]) -> Any:
    cls = mav_module.mavlink_map[getattr(mav_module, f"MAVLINK_MSG_ID_{name}")]
    lengths = dict(zip(cls.ordered_fieldnames, cls.array_lengths, strict=True))
    args: dict[str, Any] = {}
    for fname, ftype in zip(cls.fieldnames, cls.fieldtypes, strict=True):
        if fname in fields:
            value = fields[fname]
            args[fname] = value.encode() if ftype == "char" else value
        elif ftype == "char":
            args[fname] = b""
        elif lengths.get(fname):
            args[fname] = [0] * lengths[fname]
        else:
            args[fname] = 0
    return cls(**args)


def run(port: int, steps: list[dict[str, Any]], system: int, component: int) -> None:
    conn = mavutil.mavlink_connection(
        f"udpout:127.0.0.1:{port}", source_system=system, source_component=component,
        dialect="ardupilotmega",
    )
    mav = conn.mav
    module = mavutil.mavlink
    for step in steps:
        if "sleep" in step:
            time.sleep(float(step["sleep"]))
        elif "noise" in step:
            rng = random.Random(step.get("seed"))
            conn.write(bytes(rng.getrandbits(8) for _ in range(int(step["noise"]))))
        elif "skip_seq" in step:
            mav.seq = (mav.seq + int(step["skip_seq"])) % 256
        else:
            mav.srcSystem = int(step.get("system", system))
            mav.srcComponent = int(step.get("component", component))
            msg = _message(module, step["msg"], step.get("fields", {}))
            mavlink1 = bool(step.get("mavlink1", False))
            interval = float(step.get("interval", 0.0))
            for _ in range(int(step.get("count", 1))):
                if step.get("corrupt"):
                    buf = bytearray(msg.pack(mav, force_mavlink1=mavlink1))
                    header = 6 if mavlink1 else 10
                    buf[header] ^= 0xFF  # first payload byte: length intact, CRC wrong
                    conn.write(bytes(buf))
                    mav.seq = (mav.seq + 1) % 256
                else:
                    mav.send(msg, force_mavlink1=mavlink1)
                if interval:
                    time.sleep(interval)
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steps", required=True, help="JSON list of steps")
    parser.add_argument("--system", type=int, default=1)
    parser.add_argument("--component", type=int, default=1)
    args = parser.parse_args(argv)
    run(args.port, json.loads(args.steps), args.system, args.component)
    return 0


if __name__ == "__main__":
    sys.exit(main())
