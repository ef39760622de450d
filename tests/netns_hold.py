"""Run inside a private network namespace (see test_upload_rules.py): hold rules on real
interfaces. Prints one JSON line: when each change was made, what was emitted, what arrived.

Two veth pairs stand for a modem (pxa, far end pxb) and Wi-Fi (pxc, far end pxd). Two
sinks, each to its own local receiver:

- "interface": hold cam.* unless pxa is up; pxb is taken down and up again;
- "route": hold cam.* while the default route is pxa; the route moves from pxc to pxa
  and back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def main() -> None:
    ip("link", "set", "lo", "up")
    ip("link", "add", "pxa", "type", "veth", "peer", "name", "pxb")
    ip("link", "add", "pxc", "type", "veth", "peer", "name", "pxd")
    for name in ("pxa", "pxb", "pxc", "pxd"):
        ip("link", "set", name, "up")
    ip("addr", "add", "10.77.0.1/24", "dev", "pxa")
    ip("addr", "add", "10.78.0.1/24", "dev", "pxc")
    ip("route", "add", "default", "via", "10.78.0.2", "dev", "pxc")
    time.sleep(0.3)  # veth carriers come up

    from plexus.config import load_config_text
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins
    from plexus.testing import Receiver

    arrivals: dict[str, list[list[Any]]] = {"interface": [], "route": []}
    lock = threading.Lock()

    def stamp(name: str) -> Any:
        def check(point: dict[str, Any]) -> None:
            with lock:
                arrivals[name].append([time.time(), point["metric"], point["value"]])
        return check

    tmp = Path(tempfile.mkdtemp(prefix="plexus-netns-"))
    with Receiver(api_keys=None, extra_check=stamp("interface")) as rx_if, \
            Receiver(api_keys=None, extra_check=stamp("route")) as rx_route:
        text = (f"source_id: rig-01\napi_key: plx_test\n"
                f"buffer: {{type: sqlite, path: {tmp / 'rig.db'}}}\nbatch: {{interval: 0.05}}\n"
                "sinks:\n"
                f"  - type: plexus\n    name: interface\n    gateway_url: {rx_if.url}\n"
                "    upload:\n      hold: ['cam.*']\n"
                "      hold_unless: {interface_up: pxa, every: 0.1}\n"
                f"  - type: plexus\n    name: route\n    gateway_url: {rx_route.url}\n"
                "    upload:\n      hold: ['cam.*']\n"
                "      hold_while: {default_route: pxa, every: 0.1}\n")
        registry = load_plugins()
        config = load_config_text(text, str(tmp / "rig.yaml"), adapter_types=registry.adapters,
                                  sink_types=registry.sinks)
        gateway = Gateway(config, registry)
        gateway.start()
        emitted: list[list[Any]] = []
        stop = threading.Event()

        def produce() -> None:
            n = 0
            while not stop.is_set():
                emitted.append([time.time(), n])
                gateway.pipeline.emit("cam.frame", n)
                gateway.pipeline.emit("imu.x", n)
                n += 1
                time.sleep(0.01)

        producer = threading.Thread(target=produce)
        producer.start()
        marks: dict[str, float] = {}
        steps = [
            ("pxb_down", ("link", "set", "pxb", "down")),
            ("pxb_up", ("link", "set", "pxb", "up")),
            ("route_to_pxa", ("route", "replace", "default", "via", "10.77.0.2", "dev", "pxa")),
            ("route_to_pxc", ("route", "replace", "default", "via", "10.78.0.2", "dev", "pxc")),
        ]
        for name, command in steps:
            time.sleep(1.5)
            ip(*command)
            marks[name] = time.time()
        time.sleep(1.0)
        stop.set()
        producer.join()
        total = len(emitted)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(
                sum(1 for a in arrivals[k] if a[1] == "cam.frame") for k in arrivals) < total:
            time.sleep(0.05)
        gateway.shutdown(5.0)
    print(json.dumps({"marks": marks, "emitted": emitted, "arrivals": arrivals}), flush=True)


if __name__ == "__main__":
    main()
