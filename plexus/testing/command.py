"""``python -m plexus.testing`` and ``plexus-gateway receiver``: a receiver until Ctrl-C."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence

from plexus.testing.receiver import Receiver
from plexus.testing.rules import GATEWAY_RATE_LIMIT_INTERVAL


def main(argv: Sequence[str] | None = None, prog: str = "python -m plexus.testing") -> int:
    """``python -m plexus.testing``: run a receiver until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a local Plexus-compatible ingest receiver (POST /ingest).",
    )
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted key (repeatable); default: any non-empty key")
    parser.add_argument("--rate-limit", nargs="?", type=float, const=GATEWAY_RATE_LIMIT_INTERVAL,
                        default=None, metavar="SECONDS",
                        help="emulate the per-source rate ceiling (default interval 0.0005)")
    parser.add_argument("--quiet", action="store_true", help="no line per accepted point")
    parser.add_argument("--ws-generation", choices=("hosted", "oss"), default="hosted",
                        help="the device WebSocket (/ws/device) speaks as the hosted platform "
                             "(declared commands) or the open-source gateway (legacy only)")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    receiver = Receiver(args.port, args.host, api_keys=args.api_keys,
                        rate_limit_interval=args.rate_limit, log=say,
                        log_points=not args.quiet, ws_generation=args.ws_generation)
    stop = threading.Event()
    with receiver:
        say(f"plexus test receiver listening on {receiver.url} (POST /ingest) and "
            f"{receiver.ws_url}/ws/device; Ctrl-C stops")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    say(f"stopped; {receiver.count} points stored from {len(receiver.requests)} requests")
    return 0

