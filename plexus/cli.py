"""``plexus-gateway``: run a rig file, check it, and operate a rig from the shell.

    plexus-gateway --config rig.yaml [--check] [--dry-run] [--duration S] [--log-level L]
    plexus-gateway plugins
    plexus-gateway options [TYPE ...] [--markdown]
    plexus-gateway send METRIC VALUE [--tag k=v ...] [--timestamp T] [--config rig.yaml]
    plexus-gateway buffer --path FILE [--flush] [--config rig.yaml]
    plexus-gateway receiver [--port 8080] [--api-key KEY ...]

Exit codes: 0 success (also after SIGINT/SIGTERM), 1 runtime failure, 2 bad
usage or an invalid config.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from plexus.errors import PlexusError

log = logging.getLogger("plexus.cli")

SUBCOMMANDS = ("plugins", "options", "send", "buffer", "receiver")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        command, rest = args[0], args[1:]
        return int(globals()[f"cmd_{command}"](rest) or 0)
    return cmd_run(args)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if level.lower() != "debug":
        # httpx logs every request at INFO: one line per batch drowns the status.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _load(path: str) -> tuple[Any, Any]:
    from plexus.config import load_config
    from plexus.plugins import load_plugins

    registry = load_plugins()
    config = load_config(path, adapter_types=registry.adapters, sink_types=registry.sinks)
    return config, registry


# --- run ------------------------------------------------------------------------------


def cmd_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plexus-gateway",
        description="Run the adapters of a rig file and deliver their readings. "
                    f"Other commands: {', '.join(SUBCOMMANDS)} (see COMMAND --help).",
    )
    parser.add_argument("--config", "-c", required=True, help="the rig file (YAML)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the plugins it needs, then exit")
    parser.add_argument("--dry-run", action="store_true", help="print points instead of sending")
    parser.add_argument("--duration", type=float, default=None,
                        help="run this many seconds, then shut down as on SIGTERM")
    parser.add_argument("--log-level", default=None,
                        help="debug, info, warning, error (default: the config's log_level)")
    parser.add_argument("--no-status", action="store_true", help="no live status view")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or "info")

    from plexus.gateway import Gateway, missing_drivers

    try:
        config, registry = _load(args.config)
        if args.log_level is None:
            logging.getLogger().setLevel(config.log_level.upper())
        gateway = Gateway(config, registry, dry_run=args.dry_run, check_only=args.check)
    except PlexusError as exc:
        print(f"plexus-gateway: {exc}", file=sys.stderr)
        return 2

    if args.check:
        problems = missing_drivers(gateway) + registry.errors
        if gateway.commands is not None:
            problems += gateway.commands.problems
        _print_check(gateway)
        gateway.pipeline.close(0)
        if gateway.receiver is not None:
            gateway.receiver.stop()
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2 if problems else 0

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        gateway.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    gateway.start()
    status = StatusView(gateway, config.status_interval, enabled=not args.no_status)
    gateway.wait(args.duration, on_tick=status.tick, tick=status.tick_seconds)
    gateway.shutdown()
    status.final()
    return 0


def _details(extra: dict[str, Any]) -> str:
    """An adapter's non-zero counters (error frames, bad CRCs, reconnects...), compact."""
    return " ".join(f"{k}={v}" for k, v in extra.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v)


def _link_line(link: dict[str, Any]) -> str:
    """The device link's state and the last command, for the status view."""
    text = f"link {link['state']}"
    if link.get("state") == "up" and link.get("since"):
        text += f" {time.time() - link['since']:.0f}s"
    elif link.get("last_error"):
        text += f" ({link['last_error'][:60]})"
    last = link.get("last_command")
    if last:
        text += (f"; last command {last['command']} {last['outcome']} "
                 f"{time.time() - last['at']:.0f}s ago")
    return text


def _print_check(gateway: Any) -> None:
    cfg = gateway.config
    print(f"config {cfg.path}: OK")
    print(f"  source_id: {gateway.source_id}")
    print(f"  buffer: {cfg.buffer.type}")
    for adapter, tags in gateway.adapters:
        print(f"  adapter {adapter.name} (type {adapter.type_name})"
              + (f" tags {tags}" if tags else ""))
    for lane in gateway.pipeline.lanes:
        print(f"  sink {lane.sink.name} (type {lane.sink.type_name})")
        rules = lane.rules
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


def _upload_line(sink: dict[str, Any]) -> str:
    parts = []
    if "held" in sink:
        state = "HOLDING" if sink["holding"] else "not holding"
        parts.append(f"held {sink['held']} ({state}: {sink['hold_rule']})")
    if "max_bytes_per_s" in sink:
        parts.append(f"sent {sink['bytes_sent']:,} bytes (cap {sink['max_bytes_per_s']:,}/s)")
    return "  ".join(parts)


class StatusView:
    """A live table on a TTY; a log line every ``interval`` seconds otherwise."""

    def __init__(self, gateway: Any, interval: float, enabled: bool = True) -> None:
        self.gateway = gateway
        self.interval = interval
        self.tty = enabled and sys.stdout.isatty()
        self.enabled = enabled
        self.tick_seconds = 1.0 if self.tty else max(0.2, min(interval, 1.0))
        self._next_log = time.monotonic() + interval
        self._last_points: dict[str, tuple[float, int]] = {}

    def _rates(self, status: dict[str, Any]) -> dict[str, float]:
        now = time.monotonic()
        rates = {}
        for a in status["adapters"]:
            then, points = self._last_points.get(a["name"], (now, a["points"]))
            rates[a["name"]] = (a["points"] - points) / (now - then) if now > then else 0.0
            self._last_points[a["name"]] = (now, a["points"])
        return rates

    def render(self, status: dict[str, Any]) -> str:
        rates = self._rates(status)
        lines = [f"plexus-gateway  source {status['source_id']}  session "
                 f"{status['session'] or '-'}  up {status['uptime']:.0f}s", "",
                 f"{'ADAPTER':<16} {'TYPE':<9} {'STATE':<13} {'POINTS':>9} {'PTS/S':>8} "
                 f"{'ERRORS':>7}  DETAILS / LAST ERROR"]
        for a in status["adapters"]:
            lines.append(f"{a['name']:<16.16} {a['type']:<9.9} {a['state']:<13.13} "
                         f"{a['points']:>9} {rates[a['name']]:>8.1f} {a['errors']:>7}  "
                         f"{_details(a['details'])[:70]}")
            if a["last_error"]:
                lines.append(f"{'':>58}  last error: {a['last_error'][:70]}")
        lines += ["", f"{'SINK':<16} {'BUFFERED':>9} {'DELIVERED':>10} {'DROPPED':>8} "
                      f"{'REJECTED':>9} {'LAG(S)':>7}  LAST ERROR"]
        for s in status["sinks"]:
            lag = "-" if s["since_last_upload"] is None else f"{s['since_last_upload']:.1f}"
            lines.append(f"{s['name']:<16.16} {s['buffered']:>9} {s['delivered']:>10} "
                         f"{s['dropped']:>8} {s['rejected']:>9} {lag:>7}  "
                         f"{(s['last_error'] or '')[:60]}")
            rules = _upload_line(s)
            if rules:
                lines.append(f"{'':<16} {rules}")
        if status.get("link"):
            lines += ["", _link_line(status["link"])]
        return "\n".join(lines)

    def tick(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[J" + self.render(self.gateway.status()) + "\n")
            sys.stdout.flush()
        elif time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + self.interval
            log.info("status %s", self._summary(self.gateway.status()))

    @staticmethod
    def _summary(status: dict[str, Any]) -> str:
        adapters = " ".join(
            f"{a['name']}={a['state']}/{a['points']}pts/{a['errors']}err"
            + (f"({_details(a['details'])})" if _details(a["details"]) else "")
            for a in status["adapters"])
        sinks = " ".join(f"{s['name']}: buffered={s['buffered']} delivered={s['delivered']} "
                         f"dropped={s['dropped']} rejected={s['rejected']}"
                         + (f" held={s['held']}{'(holding)' if s['holding'] else ''}"
                            if "held" in s else "")
                         for s in status["sinks"])
        link = f" {_link_line(status['link'])}" if status.get("link") else ""
        return f"adapters [{adapters}] sinks [{sinks}]{link}"

    def final(self) -> None:
        status = self.gateway.status()
        log.info("stopped: %s", self._summary(status))
        receiver = self.gateway.receiver
        if receiver is not None:
            metrics = receiver.metrics()
            groups: dict[str, list[str]] = {}
            for name in metrics:
                groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
            print(f"\nlocal receiver stored {receiver.count} points in {len(metrics)} metrics:")
            for group, names in sorted(groups.items()):
                points = sum(len(metrics[n]) for n in names)
                sample = sorted(names)[0]
                print(f"  {group + '.*':<32} {points:>7} points in {len(names):>3} metrics, "
                      f"e.g. {sample} = {metrics[sample][-1]!r}")


# --- plugins --------------------------------------------------------------------------


def cmd_plugins(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="plexus-gateway plugins",
                                     description="List adapter and sink types and who provides them.")
    parser.parse_args(argv)
    _setup_logging("warning")
    from plexus.plugins import load_plugins

    registry = load_plugins()
    print(f"{'KIND':<8} {'TYPE':<16} {'PACKAGE':<28} VERSION")
    for kind, name, package, version in registry.rows():
        print(f"{kind:<8} {name:<16} {package:<28} {version}")
    for name in registry.disabled:
        print(f"disabled plugin: {name}")
    for error in registry.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if registry.errors else 0


# --- options ------------------------------------------------------------------------


def options_markdown(registry: Any, types: list[str] | None = None,
                     top_level: bool | None = None) -> str:
    """Every rig-file key and every adapter/sink option, with type, default and help."""
    from plexus.config import RigConfig, describe_options

    def table(rows: list[tuple[str, str, str, str]]) -> list[str]:
        out = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, kind, default, help_text in rows:
            out.append(f"| `{name}` | {kind} | `{default}` | {help_text} |".replace("\n", " "))
        return out

    lines: list[str] = []
    if top_level or (top_level is None and not types):
        from plexus.upload_rules import ConditionSpec, UploadRules

        top = [r for r in describe_options(RigConfig) if r[0] not in ("adapters", "sinks")]
        lines += ["## Top-level keys", "", *table(top), ""]
        lines += ["## Upload rules of a sink (`upload:`)", "",
                  "Any entry of `sinks:` may carry `upload:` (see [fleet.md](fleet.md#uploads-that-respect-the-link)).", "",
                  *table(describe_options(UploadRules)), "",
                  "A condition (`hold_while:` / `hold_unless:`) takes exactly one of `file`, "
                  "`command`, `interface_up`, `default_route`:", "",
                  *table(describe_options(ConditionSpec)), ""]
    for kind, found in (("adapter", registry.adapters), ("sink", registry.sinks)):
        for name in sorted(found):
            if types and name not in types:
                continue
            cls = found[name]
            provider = registry.providers[(kind, name)]
            lines += [f"## {kind} `{name}` ({provider.package})", ""]
            doc = (cls.__doc__ or "").strip().splitlines()
            if doc:
                lines += [doc[0], ""]
            lines += ["Every entry also takes `type`, `name` and `tags`"
                      + (", and `upload` (above)." if kind == "sink" else "."), ""]
            lines += [*table(describe_options(cls.Options)), ""]
    return "\n".join(lines)


def cmd_options(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plexus-gateway options",
        description="Document the rig file: top-level keys and each type's options.")
    parser.add_argument("types", nargs="*", help="only these adapter/sink types")
    args = parser.parse_args(argv)
    _setup_logging("warning")
    from plexus.plugins import load_plugins

    print(options_markdown(load_plugins(), args.types))
    return 0


# --- send -----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A shell argument as a point value: number, true/false, JSON object/array, else string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text.lstrip().startswith(("{", "[")):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return text


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"plexus-gateway send: --tag must be key=value, got {pair!r}")
        tags[key] = value
    return tags


def cmd_send(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plexus-gateway send",
        description="Send one reading (validated and delivered like any other), then exit.")
    parser.add_argument("metric")
    parser.add_argument("value", help="a number, true/false, a JSON object/array, or text")
    parser.add_argument("--tag", "-t", action="append", default=[], help="key=value (repeatable)")
    parser.add_argument("--timestamp", type=float, default=None, help="Unix seconds")
    parser.add_argument("--config", "-c", help="take source_id, api_key, gateway_url from a rig file")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to try delivering")
    args = parser.parse_args(argv)
    _setup_logging("warning")
    from plexus.client import Plexus

    settings: dict[str, Any] = {}
    try:
        if args.config:
            config, _ = _load(args.config)
            settings = {"api_key": config.api_key, "source_id": config.source_id,
                        "gateway_url": config.gateway_url, "tags": config.tags or None}
        px = Plexus(**settings, close_timeout=args.timeout)
        try:
            px.send(args.metric, parse_value(args.value), args.timestamp, _parse_tags(args.tag) or None)
            px.flush_buffer(timeout=args.timeout)
        finally:
            px.close(timeout=0)
    except PlexusError as exc:
        print(f"plexus-gateway send: {exc}", file=sys.stderr)
        return 1
    return 0


# --- buffer ---------------------------------------------------------------------------


def cmd_buffer(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plexus-gateway buffer",
        description="Show what a persistent buffer holds, and optionally deliver it now.")
    parser.add_argument("--path", required=True, help="the buffer file (.db)")
    parser.add_argument("--flush", action="store_true", help="deliver its points now")
    parser.add_argument("--config", "-c", help="take api_key/gateway_url/source_id from a rig file")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    _setup_logging("warning")
    from plexus.sqlite_buffer import buffer_stats

    if not os.path.exists(args.path):
        print(f"plexus-gateway buffer: no such file: {args.path}", file=sys.stderr)
        return 1
    try:
        stats = buffer_stats(args.path)
    except Exception as exc:
        print(f"plexus-gateway buffer: cannot read {args.path}: {exc}", file=sys.stderr)
        return 1
    print(f"{stats['path']}: {stats['points']} points, {stats['bytes']} bytes")
    if stats["points"]:
        print(f"  oldest: {_fmt_ms(stats['oldest_ms'])}\n  newest: {_fmt_ms(stats['newest_ms'])}")
    if not args.flush:
        return 0
    from plexus.client import Plexus

    settings: dict[str, Any] = {}
    if args.config:
        config, _ = _load(args.config)
        settings = {"api_key": config.api_key, "source_id": config.source_id,
                    "gateway_url": config.gateway_url}
    try:
        with Plexus(**settings, persistent_buffer=True, buffer_path=args.path) as px:
            px.flush_buffer(timeout=args.timeout)
    except PlexusError as exc:
        print(f"plexus-gateway buffer: {exc}", file=sys.stderr)
        return 1
    print("flushed: the buffer is empty")
    return 0


def _fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


# --- receiver -------------------------------------------------------------------------


def cmd_receiver(argv: list[str]) -> int:
    from plexus.testing import main as receiver_main

    return int(receiver_main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
