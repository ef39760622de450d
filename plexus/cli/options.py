"""``plexus-gateway options`` and ``schema``: the rig file documented from the code."""

from __future__ import annotations

import difflib
import json
from typing import Any

from plexus.cli.common import Parser, fail, setup_logging
from plexus.exitcodes import ExitCode

__all__ = ["cmd_options", "cmd_schema", "options_markdown"]


def options_markdown(registry: Any, types: list[str] | None = None,
                     top_level: bool | None = None) -> str:
    """Every rig-file key and every adapter/sink option, with type, limits, default and help."""
    from plexus.config import GatewaySettings, describe_options

    def table(rows: list[tuple[str, str, str, str]]) -> list[str]:
        out = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, kind, default, help_text in rows:
            cells = f"| `{name}` | {kind} | `{default}` | {help_text} |"
            out.append(cells.replace("\n", " "))
        return out

    lines: list[str] = []
    if top_level or (top_level is None and not types):
        from plexus.upload_rules import ConditionSpec, UploadRules

        lines += ["## Top-level keys", "",
                  "Besides these, `adapters:` and `sinks:` list the entries below.", "",
                  *table(describe_options(GatewaySettings)), ""]
        lines += ["## Upload rules of a sink (`upload:`)", "",
                  "Any entry of `sinks:` may carry `upload:` (see "
                  "[fleet.md](fleet.md#uploads-that-respect-the-link)).", "",
                  *table(describe_options(UploadRules)), "",
                  "A condition (`hold_while:` / `hold_unless:`) takes exactly one of `file`, "
                  "`command`, `interface_up`, `default_route`:", "",
                  *table(describe_options(ConditionSpec)), ""]
    for kind, found in (("adapter", registry.adapters), ("sink", registry.sinks)):
        qualified: dict[str, type] = getattr(found, "qualified", dict)()  # shared names
        for name in sorted([*found, *qualified]):
            if types and name not in types and name.partition("@")[0] not in types:
                continue
            cls: Any = found.get(name) or qualified[name]
            provider = found.provider(name) if hasattr(found, "provider") else None
            package = provider.package if provider else registry.providers[(kind, name)].package
            lines += [f"## {kind} `{name}` ({package})", ""]
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            if doc:
                lines += [" ".join(doc.split()), ""]
            lines += ["Every entry also takes `type`, `name` and `tags`"
                      + (", and `upload` (above)." if kind == "sink" else "."), ""]
            lines += [*table(describe_options(cls.Options)), ""]
    return "\n".join(lines)


def cmd_options(argv: list[str]) -> int:
    parser = Parser(
        prog="plexus-gateway options",
        description="Document the rig file: its top-level keys, and the options of each "
                    "adapter and sink type (installed plugins included), as Markdown.")
    parser.add_argument("types", nargs="*", metavar="TYPE",
                        help="only these adapter/sink types (see plexus-gateway plugins)")
    args = parser.parse_args(argv)
    setup_logging("warning")
    from plexus.plugins import load_plugins

    registry = load_plugins()
    known = sorted({*registry.adapters, *registry.sinks, *registry.adapters.qualified(),
                    *registry.sinks.qualified()})
    shared = {*registry.adapters.shared_names(), *registry.sinks.shared_names()}
    for name in args.types:
        if name not in known and name not in shared:
            message = f"unknown adapter or sink type {name!r}"
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            return fail(parser.prog, f"{message}; known types: {', '.join(known)}",
                        ExitCode.USAGE)
    print(options_markdown(registry, args.types))
    return ExitCode.OK


def cmd_schema(argv: list[str]) -> int:
    parser = Parser(
        prog="plexus-gateway schema",
        description="Print the JSON Schema of rig files for the adapter and sink types "
                    "installed here. Save it beside your rig files and start each with "
                    "'# yaml-language-server: $schema=rig.schema.json' so editors complete "
                    "and check them as you type.")
    parser.add_argument("--output", "-o", metavar="FILE", help="write it here, not to stdout")
    args = parser.parse_args(argv)
    setup_logging("warning")
    from plexus.config.schema import rig_schema
    from plexus.plugins import load_plugins

    registry = load_plugins()
    text = json.dumps(rig_schema(registry.adapters, registry.sinks), indent=2) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            return fail(parser.prog, f"cannot write {args.output}: {exc.strerror}",
                        ExitCode.FAILURE)
    else:
        print(text, end="")
    return ExitCode.OK
