"""A pretend ArduCopter over UDP, run as its own process by the command tests.

Usage::

    python mavlink_vehicle.py --port 14550 [--refuse 400] [--silent 176] [--in-progress 400]

It sends a HEARTBEAT (MAV_TYPE_QUADROTOR, MAV_AUTOPILOT_ARDUPILOTMEGA) and an
ATTITUDE every 0.1 s to udpout:127.0.0.1:<port>, and answers every
COMMAND_LONG (and SET_MODE, as ArduPilot does, with command 11) with a
COMMAND_ACK: MAV_RESULT_ACCEPTED, or MAV_RESULT_DENIED for the command ids
given with ``--refuse``; ids given with ``--silent`` get no answer;
``--in-progress`` ids get MAV_RESULT_IN_PROGRESS first, then ACCEPTED. An
accepted arm/disarm changes the armed flag of the following HEARTBEATs, an
accepted mode change their custom_mode. Each command received is printed on
stdout as one JSON line, so a test can check what was sent. It runs until
killed or for ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["MAVLINK20"] = "1"

from pymavlink import mavutil  # noqa: E402

ARMED = 128
CUSTOM_MODE_ENABLED = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--refuse", type=int, action="append", default=[])
    parser.add_argument("--silent", type=int, action="append", default=[])
    parser.add_argument("--in-progress", type=int, action="append", default=[])
    parser.add_argument("--duration", type=float, default=120.0)
    args = parser.parse_args(argv)
    conn = mavutil.mavlink_connection(f"udpout:127.0.0.1:{args.port}", source_system=1,
                                      source_component=1, dialect="ardupilotmega")
    mav = conn.mav
    m = mavutil.mavlink
    base_mode = CUSTOM_MODE_ENABLED
    custom_mode = 0  # STABILIZE
    end = time.monotonic() + args.duration
    next_beat = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 0.1
            mav.heartbeat_send(m.MAV_TYPE_QUADROTOR, m.MAV_AUTOPILOT_ARDUPILOTMEGA, base_mode,
                               custom_mode, m.MAV_STATE_STANDBY)
            mav.attitude_send(int(now * 1000) & 0xFFFFFFFF, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0)
        msg = conn.recv_match(type=["COMMAND_LONG", "SET_MODE"], blocking=True, timeout=0.05)
        if msg is None:
            continue
        if msg.get_type() == "SET_MODE":
            command, params = 11, [float(msg.base_mode), float(msg.custom_mode)]
        else:
            command = msg.command
            params = [msg.param1, msg.param2, msg.param3, msg.param4, msg.param5, msg.param6,
                      msg.param7]
        print(json.dumps({"command": command, "params": params,
                          "target": [getattr(msg, "target_system", None),
                                     getattr(msg, "target_component", None)]}), flush=True)
        if command in args.silent:
            continue
        if command in args.refuse:
            mav.command_ack_send(command, m.MAV_RESULT_DENIED)
            continue
        if command in args.in_progress:
            mav.command_ack_send(command, m.MAV_RESULT_IN_PROGRESS, progress=50)
            time.sleep(0.2)
        if command == m.MAV_CMD_COMPONENT_ARM_DISARM:
            base_mode = base_mode | ARMED if params[0] == 1 else base_mode & ~ARMED
        elif command == m.MAV_CMD_DO_SET_MODE or command == 11:
            custom_mode = int(params[1])
        mav.command_ack_send(command, m.MAV_RESULT_ACCEPTED)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
