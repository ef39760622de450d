"""``plexus-gateway --config rig.yaml``: run a rig (or ``--check`` it) until told to stop."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from plexus.cli.common import (
    Parser,
    config_problems_text,
    fail,
    load_rig,
    print_error,
    setup_logging,
)
from plexus.cli.status import make_status_view
from plexus.errors import PlexusError
from plexus.exitcodes import ExitCode

log = logging.getLogger("plexus.cli")
PROG = "plexus-gateway"


def run_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        usage="%(prog)s [run] --config RIG.yaml [options]",
        description="Run the adapters of a rig file and deliver their readings until "
                    "SIGINT/SIGTERM (or --duration), then deliver what is buffered.",
        epilog="Exit codes: 0 ok (also after SIGINT/SIGTERM), 69 no adapter could start or "
               "every one failed, 77 no API key or the platform refused it, 78 the rig file "
               "is invalid or --check found a problem. Other commands: plexus-gateway help.",
    )
    parser.add_argument("--config", "-c", required=True, metavar="RIG.yaml",
                        help="the rig file (YAML); see plexus-gateway options")
    parser.add_argument("--check", action="store_true",
                        help="find everything that would fail at start (all at once), then exit")
    parser.add_argument("--online", action="store_true",
                        help="with --check: also ask the platform to accept the key, connect to "
                             "brokers, open ports and CAN interfaces (sends no data)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print points on stdout instead of delivering them")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="run this long, then shut down as on SIGTERM")
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="default: the rig file's log_level (info)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line, for journald and log shippers")
    parser.add_argument("--no-status", action="store_true",
                        help="no status view and no periodic status lines")
    return parser


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    if args.online and not args.check:
        return fail(PROG, "--online only goes with --check", ExitCode.USAGE)
    setup_logging(args.log_level or "info", args.log_format)

    from plexus.gateway import Gateway

    try:
        config, registry = load_rig(args.config)
    except PlexusError as exc:
        return fail(PROG, _config_message(args.config, exc), ExitCode.CONFIG)
    if args.log_level is None:
        logging.getLogger().setLevel(config.log_level.upper())
    try:
        gateway = Gateway(config, registry, dry_run=args.dry_run, check_only=args.check)
    except PlexusError as exc:
        return fail(PROG, _config_message(args.config, exc), ExitCode.CONFIG)

    if args.check:
        return _check(gateway, registry, args.online)
    if not args.dry_run and not config.local_receiver.enabled:
        missing = gateway.missing_key_problems()
        if missing:
            gateway.pipeline.close(0)
            return fail(PROG, "\n".join(str(p) for p in missing), ExitCode.AUTH)
    for error in registry.errors:
        log.warning("%s", error)
    return _run(gateway, args)


def _config_message(path: str, exc: Exception) -> str:
    """One problem on one line; several as a count and a list."""
    if len(getattr(exc, "errors", ())) > 1:
        return f"{path}: {config_problems_text(exc)}"
    return str(exc)


def _check(gateway: Any, registry: Any, online: bool) -> int:
    from plexus.preflight import check_gateway

    try:
        problems = [str(p) for p in check_gateway(gateway, online=online)]
    finally:
        gateway.pipeline.close(0)
    if not gateway.adapters and gateway.commands is None:
        problems.append(f"{gateway.config.path}: adapters: none are configured, so nothing "
                        "would produce points")
    if gateway.commands is not None:
        problems += [f"{gateway.config.path}: commands: {p}" for p in gateway.commands.problems]
    problems += [f"plugin: {error}" for error in registry.errors]
    notes = [f"  note: {warning}" for warning in registry.warnings]
    if problems:
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        print_error(PROG, f"{gateway.config.path}: {count} found:")
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        for note in notes:
            print(note, file=sys.stderr)
        only_key = all("API key" in p for p in problems)
        return ExitCode.AUTH if only_key else ExitCode.CONFIG
    _print_check(gateway, online)
    for note in notes:
        print(note)
    return ExitCode.OK


def _print_check(gateway: Any, online: bool) -> None:
    cfg = gateway.config
    print(f"{cfg.path}: OK{' (online checks passed)' if online else ''}")
    print(f"  source_id: {gateway.source_id}" if not gateway.source_id_pending else
          "  source_id: none set; one is generated and saved to ~/.plexus/config.json at the "
          "first run")
    print(f"  buffer: {cfg.buffer.type}")
    for adapter, tags in gateway.adapters:
        print(f"  adapter {adapter.name} (type {adapter.type_name})"
              + (f" tags {tags}" if tags else ""))
    for sink, entry in gateway.sinks:
        print(f"  sink {sink.name} (type {sink.type_name})")
        rules = entry.upload if entry is not None else None
        if rules is not None and rules.max_bytes_per_s:
            print(f"    upload at most {rules.max_bytes_per_s:,} bytes/s (burst "
                  f"{rules.burst_bytes or rules.max_bytes_per_s:,})")
        if rules is not None and rules.hold:
            always = f"; never held: {', '.join(rules.always)}" if rules.always else ""
            print(f"    hold {rules.describe_hold()}{always}")
    if gateway.commands is not None:
        commands = gateway.commands
        print(f"  commands: link {commands.link.url if commands.link else '-'}, audit file "
              f"{commands.audit.path}")
        print(f"    allowed: {', '.join(commands.allowed) or 'none'}")
        for name, reason in sorted(commands.center.refusals.items()):
            print(f"    refused: {name}: {reason}")
    if not online:
        print("  (add --online to also try the API key, brokers, ports and interfaces)")


def _run(gateway: Any, args: Any) -> int:
    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        gateway.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    gateway.start()
    if not gateway.adapters and gateway.commands is None:
        log.error("no adapters are configured: nothing to run")
        gateway.shutdown(0)
        return ExitCode.UNAVAILABLE
    if gateway.commands is None and len(gateway.failed_adapters()) == len(gateway.adapters):
        summary = _failure_summary(gateway, "no adapter could start")
        gateway.shutdown(0)
        print_error(PROG, summary)
        return ExitCode.UNAVAILABLE

    view = make_status_view(gateway, gateway.config.status_interval,
                            enabled=not args.no_status, live=args.log_format == "text"
                            and not args.dry_run)

    def on_tick() -> None:
        view.tick()
        if gateway.nothing_left_to_run():
            if gateway.failed_adapters():
                log.error("every adapter has stopped for good: shutting down")
            else:
                log.info("every adapter has finished: shutting down")
            gateway.request_stop()

    try:
        gateway.wait(args.duration, on_tick=on_tick, tick=view.tick_seconds)
    finally:
        view.close()
    all_failed = bool(gateway.adapters) and \
        len(gateway.failed_adapters()) == len(gateway.adapters)
    summary = _failure_summary(gateway, "every adapter failed")
    gateway.shutdown()
    view.final()
    if all_failed:
        print_error(PROG, summary)
        return ExitCode.UNAVAILABLE
    return _outcome(gateway)


def _outcome(gateway: Any) -> int:
    for lane in gateway.pipeline.lanes:
        error = lane.uploader.auth_error
        if error is not None:
            left = len(lane.buffer)
            print_error(PROG, f"sink {lane.sink.name}: {error}; {left} points were not "
                              "delivered (set PLEXUS_API_KEY or api_key in the rig file)")
            return ExitCode.AUTH
    return ExitCode.OK


def _failure_summary(gateway: Any, head: str) -> str:
    lines = [f"{head}:"]
    for adapter in gateway.failed_adapters():
        entry = gateway.entries.get(adapter.name)
        where = f"{gateway.config.path}:{entry.line}: " if entry is not None else ""
        lines.append(f"  {where}adapter {adapter.name}: {adapter.last_error}")
    return "\n".join(lines)
