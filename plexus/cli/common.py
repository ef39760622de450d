"""What every ``plexus-gateway`` command shares: its parser, its messages, its logging."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import time
from typing import Any, NoReturn

from plexus.exitcodes import ExitCode

__all__ = ["Parser", "fail", "load_rig", "print_error", "setup_logging"]


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def fail(prog: str, message: str, code: ExitCode) -> int:
    """Say one thing on stderr and return ``code`` (for ``return fail(...)``)."""
    print_error(prog, message)
    return int(code)


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a mistyped option and our exit code for bad usage."""

    def error(self, message: str) -> NoReturn:
        match = message.startswith("unrecognized arguments: ")
        if match:
            options = [o for action in self._actions for o in action.option_strings]
            hints = []
            for word in message.split(": ", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], options, n=1)
                if word.startswith("-") and close:
                    hints.append(f"{word} -> did you mean {close[0]}?")
            if hints:
                message += f" ({'; '.join(hints)})"
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n"
                                  f"(see {self.prog} --help)\n")


# --- logging ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, and
    ``status`` (the whole status as an object) on status lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        status = getattr(record, "status", None)
        if status is not None:
            entry["status"] = status
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if level.lower() != "debug":
        # httpx logs every request at INFO: one line per batch drowns the status.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def load_rig(path: str) -> tuple[Any, Any]:
    """The rig file and the plugin registry it was validated against.

    Raises:
        ConfigErrors: the file is invalid (every problem is listed).
    """
    from plexus.config import load_config
    from plexus.plugins import load_plugins

    registry = load_plugins()
    config = load_config(path, adapter_types=registry.adapters, sink_types=registry.sinks)
    return config, registry


def config_problems_text(exc: Exception) -> str:
    """A ConfigErrors as the operator reads it: a count, then one problem per line."""
    problems = getattr(exc, "errors", None)
    if not problems:
        return str(exc)
    count = len(problems)
    head = "1 problem" if count == 1 else f"{count} problems"
    return f"{head}:\n" + "\n".join(f"  {problem}" for problem in problems)
