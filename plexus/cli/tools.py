"""The operator's other commands: ``plugins``, ``send``, ``buffer`` and ``receiver``."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

from plexus.cli.common import Parser, config_problems_text, fail, load_rig, setup_logging
from plexus.errors import AuthenticationError, ConfigError, PlexusError, ValidationError
from plexus.exitcodes import ExitCode

__all__ = ["cmd_buffer", "cmd_plugins", "cmd_receiver", "cmd_send", "parse_value"]

NO_KEY = ("no API key: pass --api-key, set the environment variable PLEXUS_API_KEY, or name "
          "a rig file with api_key: ${PLEXUS_API_KEY} (--config)")


# --- plugins --------------------------------------------------------------------------


def cmd_plugins(argv: list[str]) -> int:
    parser = Parser(prog="plexus-gateway plugins",
                    description="List adapter and sink types and the packages that provide them.")
    parser.parse_args(argv)
    setup_logging("critical")  # errors are listed below, once
    from plexus.plugins import load_plugins

    registry = load_plugins()
    print(f"{'KIND':<8} {'TYPE':<16} {'PACKAGE':<28} VERSION")
    for kind, name, package, version in registry.rows():
        print(f"{kind:<8} {name:<16} {package:<28} {version}")
    for name in registry.disabled:
        print(f"disabled plugin: {name}")
    for warning in registry.warnings:
        print(f"note: {warning}")
    for error in registry.errors:
        fail(parser.prog, error, ExitCode.FAILURE)
    return ExitCode.FAILURE if registry.errors else ExitCode.OK


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


def _parse_tags(prog: str, pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(fail(prog, f"--tag must be key=value, got {pair!r}", ExitCode.USAGE))
        tags[key] = value
    return tags


def _connection_args(parser: Parser) -> None:
    parser.add_argument("--api-key", metavar="KEY",
                        help="the platform API key (default: PLEXUS_API_KEY, the rig file's "
                             "api_key, ~/.plexus/config.json)")
    parser.add_argument("--source-id", metavar="ID", help="default: PLEXUS_SOURCE_ID, the rig "
                        "file's source_id, ~/.plexus/config.json")
    parser.add_argument("--gateway-url", metavar="URL", help="default: PLEXUS_GATEWAY_URL, the "
                        "rig file's gateway_url, https://gateway.plexus.company")
    parser.add_argument("--config", "-c", metavar="RIG.yaml",
                        help="take api_key, source_id and gateway_url from a rig file")


def _settings(prog: str, args: Any) -> dict[str, Any]:
    """Connection settings: flags win over the rig file, which wins over the environment."""
    settings: dict[str, Any] = {}
    if args.config:
        config, _ = load_rig(args.config)
        settings = {"api_key": config.api_key, "source_id": config.source_id,
                    "gateway_url": config.gateway_url}
        if getattr(args, "tags_from_config", False):
            settings["tags"] = config.tags or None
    for name in ("api_key", "source_id", "gateway_url"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return {k: v for k, v in settings.items() if v is not None}


def _has_key(settings: dict[str, Any]) -> bool:
    if settings.get("api_key") or os.environ.get("PLEXUS_API_KEY"):
        return True
    from plexus.client import read_user_config

    return bool(read_user_config().get("api_key"))


def cmd_send(argv: list[str]) -> int:
    parser = Parser(
        prog="plexus-gateway send",
        description="Send one reading (validated like any other), wait until the platform "
                    "has it, then exit.",
        epilog="Exit codes: 0 delivered, 65 the reading is invalid, 75 not delivered in time "
               "(network, platform), 77 no API key or the platform refused it, 78 the rig file "
               "is invalid.")
    parser.add_argument("metric")
    parser.add_argument("value", help="a number, true/false, a JSON object/array, or text")
    parser.add_argument("--tag", "-t", action="append", default=[], metavar="KEY=VALUE",
                        help="a tag (repeatable)")
    parser.add_argument("--timestamp", type=float, default=None, help="Unix seconds or ms")
    _connection_args(parser)
    parser.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                        help="how long to try delivering (default 15)")
    args = parser.parse_args(argv)
    args.tags_from_config = True
    prog = parser.prog
    setup_logging("critical")  # this command says one thing, below
    from plexus.client import Plexus
    from plexus.point import make_point

    try:
        settings = _settings(prog, args)
    except ConfigError as exc:
        return fail(prog, config_problems_text(exc), ExitCode.CONFIG)
    tags = {**(settings.pop("tags", None) or {}), **_parse_tags(prog, args.tag)} or None
    value = parse_value(args.value)
    try:
        make_point(args.metric, value, args.timestamp, tags)
    except ValidationError as exc:
        return fail(prog, f"invalid reading, nothing was sent: {exc}", ExitCode.DATA)
    if not _has_key(settings):
        return fail(prog, f"{NO_KEY}; nothing was sent", ExitCode.AUTH)
    try:
        px = Plexus(**settings, close_timeout=0)
    except PlexusError as exc:
        return fail(prog, str(exc), ExitCode.USAGE)
    try:
        px.send(args.metric, value, args.timestamp, tags)
        delivered = px.flush_buffer(timeout=args.timeout)
    except AuthenticationError as exc:
        return fail(prog, f"{_plain(exc)}; the reading was not sent", ExitCode.AUTH)
    except PlexusError as exc:
        return fail(prog, f"could not deliver within {args.timeout:g} s ({_plain(exc)}); "
                          "the reading was not sent", ExitCode.TEMPFAIL)
    finally:
        px.close(timeout=0)
    if not delivered:
        return fail(prog, f"could not deliver within {args.timeout:g} s; the reading was "
                          "not sent", ExitCode.TEMPFAIL)
    return ExitCode.OK


def _plain(exc: Exception) -> str:
    """The error without the embedded client's advice about buffers (a CLI keeps none)."""
    return str(exc).replace("; the data stays buffered", "")


# --- buffer ---------------------------------------------------------------------------


def cmd_buffer(argv: list[str]) -> int:
    parser = Parser(
        prog="plexus-gateway buffer",
        description="Show what a persistent buffer holds, and optionally deliver it now "
                    "(stop the gateway that owns it first).")
    parser.add_argument("--path", required=True, help="the buffer file (.db)")
    parser.add_argument("--flush", action="store_true", help="deliver its points now")
    _connection_args(parser)
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    prog = parser.prog
    setup_logging("warning")
    from plexus.sqlite_buffer import buffer_stats

    if not os.path.exists(args.path):
        return fail(prog, f"no such file: {args.path}", ExitCode.FAILURE)
    try:
        stats = buffer_stats(args.path)
    except Exception as exc:
        return fail(prog, f"cannot read {args.path}: {exc}", ExitCode.FAILURE)
    print(f"{stats['path']}: {stats['points']} points, {stats['bytes']} bytes")
    if stats["points"]:
        print(f"  oldest: {_fmt_ms(stats['oldest_ms'])}\n  newest: {_fmt_ms(stats['newest_ms'])}")
    if not args.flush:
        return ExitCode.OK
    from plexus.client import Plexus

    try:
        settings = _settings(prog, args)
    except ConfigError as exc:
        return fail(prog, config_problems_text(exc), ExitCode.CONFIG)
    if not _has_key(settings):
        return fail(prog, f"{NO_KEY}; the buffer was left as it is", ExitCode.AUTH)
    logging.getLogger("plexus").setLevel(logging.ERROR)
    try:
        with Plexus(**settings, persistent_buffer=True, buffer_path=args.path) as px:
            px.flush_buffer(timeout=args.timeout)
    except AuthenticationError as exc:
        return fail(prog, f"{_plain(exc)}; the buffer keeps its points", ExitCode.AUTH)
    except PlexusError as exc:
        return fail(prog, f"{_plain(exc)}; the buffer keeps what was not delivered",
                    ExitCode.TEMPFAIL)
    print("flushed: the buffer is empty")
    return ExitCode.OK


def _fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


# --- receiver -------------------------------------------------------------------------


def cmd_receiver(argv: list[str]) -> int:
    from plexus.testing import main as receiver_main

    return int(receiver_main(argv, prog="plexus-gateway receiver") or 0)
