"""``plexus-gateway``: run a rig file, check it, and operate a rig from the shell.

    plexus-gateway --config rig.yaml [--check [--online]] [--dry-run] [--duration S]
    plexus-gateway COMMAND [ARGS]     (run, plugins, options, schema, send, buffer, receiver, help)
    plexus-gateway --version

The exit codes are :class:`plexus.exitcodes.ExitCode`; docs/cli.md has the table.
"""

from __future__ import annotations

import difflib
import platform
import re
import sys
from collections.abc import Sequence
from importlib import metadata

from plexus.cli.common import fail, print_error
from plexus.cli.options import cmd_options, cmd_schema, options_markdown
from plexus.cli.run import cmd_run
from plexus.cli.tools import cmd_buffer, cmd_plugins, cmd_receiver, cmd_send, parse_value
from plexus.exitcodes import ExitCode

__all__ = ["fail", "help_text", "main", "options_markdown", "parse_value", "version_text"]

#: name -> (function, one line of help)
COMMANDS = {
    "run": (cmd_run, "run a rig file (the same as giving --config alone)"),
    "plugins": (cmd_plugins, "list adapter and sink types and the packages that provide them"),
    "options": (cmd_options, "document the rig file's keys and each type's options"),
    "schema": (cmd_schema, "print the JSON Schema of rig files, for editors"),
    "send": (cmd_send, "send one reading from a shell script"),
    "buffer": (cmd_buffer, "show what a persistent buffer holds, or deliver it now"),
    "receiver": (cmd_receiver, "run a local Plexus-compatible receiver to test against"),
}

HELP = """\
plexus-gateway: deliver CAN, MQTT, MAVLink, serial and Python readings to Plexus

usage: plexus-gateway --config RIG.yaml [--check [--online]] [--dry-run] [--duration S]
       plexus-gateway COMMAND [ARGS ...]
       plexus-gateway --version

commands:
{commands}
  help       this text, or a command's own: plexus-gateway help COMMAND

examples:
  plexus-gateway --config configs/demo.yaml --duration 10   # a demo: no hardware, no account
  plexus-gateway --config rig.yaml --check --online         # will it start? is the key good?
  plexus-gateway send engine.rpm 3450 --tag rig=A           # one reading (key: PLEXUS_API_KEY)

Each command has its own --help. Exit codes: 0 ok, 2 bad usage, 69 nothing could start,
75 could not deliver (try again), 77 no or refused API key, 78 invalid rig file.
"""


def help_text() -> str:
    commands = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    return HELP.format(commands=commands)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        # A bare command is a question, not a run: answer it, and say "usage" to scripts.
        sys.stdout.write(help_text())
        return ExitCode.USAGE
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        sys.stdout.write(help_text())
        return ExitCode.OK
    if first == "help":
        if not rest:
            sys.stdout.write(help_text())
            return ExitCode.OK
        return main([rest[0], "--help"]) if rest[0] in COMMANDS else _unknown(rest[0])
    if first in ("-V", "--version", "version"):
        print(version_text())
        return ExitCode.OK
    if first.startswith("-"):
        return int(cmd_run(args))
    if first in COMMANDS:
        return int(COMMANDS[first][0](rest))
    return _unknown(first)


def _unknown(name: str) -> int:
    message = f"unknown command {name!r}"
    close = difflib.get_close_matches(name, [*COMMANDS, "help"], n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    elif name.endswith((".yaml", ".yml")):
        message += f" (to run a rig file: plexus-gateway --config {name})"
    print_error("plexus-gateway", f"{message}; commands: {', '.join(COMMANDS)}, help")
    return ExitCode.USAGE


# --- --version ------------------------------------------------------------------------

_EXTRA = re.compile(r"""^([A-Za-z0-9_.\-]+).*;\s*extra\s*==\s*["']([a-z0-9_\-]+)["']""")


def version_text() -> str:
    """The package, Python, and which adapter extras (driver libraries) are installed."""
    from plexus import __version__
    from plexus.buildinfo import BUILD_DATE

    lines = [f"plexus-gateway {__version__} (built {BUILD_DATE}: an earlier system clock is "
             "not trusted, docs/time.md)",
             f"Python {platform.python_version()} ({sys.executable})"]
    extras: dict[str, list[str]] = {}
    try:
        requirements = metadata.requires("plexus-gateway") or []
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        requirements = []
    for requirement in requirements:
        match = _EXTRA.match(requirement)
        if match and match.group(2) not in ("all", "test"):
            extras.setdefault(match.group(2), []).append(match.group(1))
    if extras:
        lines.append("adapter extras:")
    for extra, packages in extras.items():
        found, missing = [], []
        for package in packages:
            try:
                found.append(f"{package} {metadata.version(package)}")
            except metadata.PackageNotFoundError:
                missing.append(package)
        if missing:
            lines.append(f"  {extra:<8} not installed ({', '.join(missing)} missing): "
                         f"pip install 'plexus-gateway[{extra}]'")
        else:
            lines.append(f"  {extra:<8} installed ({', '.join(found)})")
    return "\n".join(lines)


