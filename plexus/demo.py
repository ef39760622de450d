"""Simulated readings for the built-in demo (``configs/demo.yaml``): no hardware needed."""

from __future__ import annotations

import math
import random
import time

_start = time.monotonic()


def engine() -> dict[str, float | int | str | bool]:
    """An engine warming up under a slowly varying load: a dict of metric → value."""
    t = time.monotonic() - _start
    load = 0.5 + 0.4 * math.sin(t / 7.0)
    rpm = 900 + 4200 * load + random.gauss(0, 25)
    coolant = 90.0 - 70.0 * math.exp(-t / 60.0) + random.gauss(0, 0.2)
    return {
        "engine.rpm": round(rpm, 1),
        "engine.coolant_temp": round(coolant, 2),
        "engine.load": round(load, 3),
        "engine.running": True,
        "engine.mode": "eco" if load < 0.5 else "sport",
    }


def imu() -> list[tuple[str, float]]:
    """A vibrating IMU: a list of (metric, value) tuples."""
    t = time.monotonic() - _start
    return [
        ("imu.accel_x", round(0.2 * math.sin(40 * t) + random.gauss(0, 0.01), 4)),
        ("imu.accel_y", round(0.1 * math.cos(33 * t) + random.gauss(0, 0.01), 4)),
        ("imu.accel_z", round(9.81 + random.gauss(0, 0.02), 4)),
    ]
