"""A receiver in its own process: ``plexus`` (plexus.testing.Receiver) or
``influx`` (answers 204 to POST /api/v2/write and counts the lines received).

Prints ``READY <port>``, then answers ``stats``, ``clear`` and ``quit`` on
stdin with one JSON line each. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class InfluxReceiver:
    """Just enough of InfluxDB's v2 write endpoint: 204 and a line count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clear()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                received_at = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                wire = len(body)
                if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                    body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
                lines = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
                if self.path.startswith("/api/v2/write"):
                    receiver.record(lines, wire, len(body), received_at)
                    self.send_response(204)
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, lines: int, wire: int, decoded: int, t: float) -> None:
        with self.lock:
            self.count += lines
            self.requests += 1
            self.body_bytes += wire
            self.decoded_bytes += decoded
            if self.first_t is None:
                self.first_t = t
            self.last_t = t

    def clear(self) -> None:
        with self.lock:
            self.count = self.requests = self.body_bytes = self.decoded_bytes = 0
            self.first_t: float | None = None
            self.last_t: float | None = None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"count": self.count, "requests": self.requests, "rate_limited": 0,
                    "body_bytes": self.body_bytes, "decoded_bytes": self.decoded_bytes,
                    "first_t": self.first_t, "last_t": self.last_t, "errors": 0}

    def stop(self) -> None:
        self.server.shutdown()


class PlexusReceiver:
    def __init__(self, rate_limit: float | None, validate: bool, store: bool = False) -> None:
        from plexus.testing import Receiver

        self.rx = Receiver(api_keys=None, rate_limit_interval=rate_limit, store=store,
                           validate=validate).start()
        self.port = self.rx.port

    def stats(self) -> dict[str, Any]:
        reqs = self.rx.requests
        stored = [r for r in reqs if r.count > 0]
        return {
            "count": self.rx.count,
            "requests": len(reqs),
            "rate_limited": self.rx.rate_limited,
            "duplicates": self.rx.duplicates,
            "rate_limited_requests": sum(1 for r in reqs if r.rate_limited),
            "body_bytes": sum(r.body_bytes for r in stored),
            "decoded_bytes": sum(r.decoded_bytes for r in stored),
            "gzip_requests": sum(1 for r in stored if r.gzip),
            "first_t": stored[0].received_at if stored else None,
            "last_t": stored[-1].received_at if stored else None,
            "errors": sum(1 for r in reqs if r.status != 200),
            "error_sample": next((r.error for r in reqs if r.error), None),
        }

    def clear(self) -> None:
        self.rx.clear()

    def stop(self) -> None:
        self.rx.stop()

    # For bench/fleet.py: an outage, and what arrived when.
    def down(self) -> dict[str, Any]:
        self.rx.go_down()
        return {"ok": True}

    def up(self) -> dict[str, Any]:
        self.rx.come_up()
        return {"ok": True}

    def timeline(self) -> dict[str, Any]:
        """Every request: [received_at, status, points stored, source id]."""
        return {"requests": [[r.received_at, r.status, r.count,
                              r.source_ids[0] if r.source_ids else None]
                             for r in self.rx.requests]}

    def stored(self) -> dict[str, Any]:
        """Points stored per source, and how many of them were stored twice."""
        per: dict[str, list[Any]] = {}
        for p in self.rx.points:
            per.setdefault(p["source_id"], []).append(p["value"])
        return {"per_source": {s: len(v) for s, v in per.items()},
                "duplicates": sum(len(v) - len(set(v)) for v in per.values())}


def main() -> None:
    args = json.loads(sys.argv[1])
    if args.get("cpu") is not None:
        import os

        os.sched_setaffinity(0, {args["cpu"]})
    if args["kind"] == "influx":
        server: Any = InfluxReceiver()
    else:
        server = PlexusReceiver(args.get("rate_limit"), bool(args.get("validate")),
                                bool(args.get("store")))
    print(f"READY {server.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print(json.dumps(server.stats()), flush=True)
        elif command == "clear":
            server.clear()
            print(json.dumps({"ok": True}), flush=True)
        elif command in ("down", "up", "timeline", "stored"):
            print(json.dumps(getattr(server, command)()), flush=True)
        elif command == "quit":
            print(json.dumps({"ok": True}), flush=True)
            break
    server.stop()


if __name__ == "__main__":
    main()
