"""The ``callable`` adapter: poll a Python function, or drain a generator.

The function may return (or a generator may yield):

- a number, string or bool: one reading named by the ``metric`` option;
- a dict ``{metric: value}``;
- a list of ``(metric, value)`` tuples;
- ``None``: nothing this time.

A plain function is called every ``interval`` seconds; a generator function
is iterated in the adapter's thread and each item is sent as it comes. An
exception is counted and logged (rate-limited) and polling continues; a
generator that raises or ends is started again after a backoff.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexus.adapters.base import ThreadedAdapter
from plexus.errors import AdapterError


@dataclass
class CallableOptions:
    """Options of the ``callable`` adapter."""

    function: str = field(
        metadata={"help": "what to call: 'package.module:function', or 'path/to/file.py:function' "
                          "(relative to the rig file)"},
    )
    # The limit is in metadata, not Annotated[float, Gt(0)]: `import plexus`
    # loads this module and must not pay for annotated_types.
    interval: float = field(default=1.0, metadata={"help": "seconds between calls", "gt": 0})
    metric: str | None = field(
        default=None, metadata={"help": "metric name for a function that returns a single value"}
    )
    args: list[Any] = field(default_factory=list,
                            metadata={"help": "positional arguments passed to the function"})
    kwargs: dict[str, Any] = field(default_factory=dict,
                                   metadata={"help": "keyword arguments passed to the function"})


def resolve_function(spec: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``module:function`` (or ``file.py:function``); AdapterError if impossible."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise AdapterError(f"function {spec!r} must look like 'module:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            name = f"plexus_user_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        func = getattr(module, attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as exc:
        raise AdapterError(f"cannot load function {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(func):
        raise AdapterError(f"{spec!r} is not callable")
    return func


class CallableAdapter(ThreadedAdapter):
    """Poll a function every ``interval`` seconds, or drain a generator function.

    Parameters:
        options: :class:`CallableOptions`.
        name: the adapter's name.
        func: the function itself (used by ``Plexus.poll``); overrides ``options.function``.
    """

    type_name = "callable"
    Options = CallableOptions
    reconnect_initial = 1.0

    def __init__(self, options: CallableOptions, name: str | None = None,
                 func: Callable[..., Any] | None = None, base_dir: Path | None = None) -> None:
        super().__init__(options, name)
        self.calls = 0
        self.late_ticks = 0  # ticks skipped because a call (or the machine) ran late
        self._func = func or resolve_function(options.function, base_dir)
        if options.interval <= 0:
            raise AdapterError(f"interval must be greater than 0, got {options.interval:g}")

    def connect(self) -> None:
        pass  # nothing to open; the function was resolved at construction

    def run_connected(self) -> None:
        opts: CallableOptions = self.options
        if inspect.isgeneratorfunction(self._func):
            for item in self._func(*opts.args, **opts.kwargs):
                self.calls += 1
                self._send(item)
                if self.stopping.is_set():
                    return
            raise AdapterError("the generator ended")  # restarted after a backoff
        next_call = time.monotonic()
        while not self.stopping.is_set():
            self.calls += 1
            try:
                result = self._func(*opts.args, **opts.kwargs)
            except Exception as exc:  # the user's code failing must not stop polling
                self.record_error(exc)
            else:
                self._send(result)
            # Fixed-rate schedule: the call's own duration does not stretch the period.
            # When late (a slow call, a busy machine), the missed ticks are skipped
            # rather than caught up in a burst of readings a few µs apart.
            next_call += opts.interval
            now = time.monotonic()
            if next_call < now:
                self.late_ticks += int((now - next_call) // opts.interval) + 1
                next_call += (int((now - next_call) // opts.interval) + 1) * opts.interval
            self.stopping.wait(next_call - now)

    def _send(self, result: Any) -> None:
        if result is None:
            return
        if isinstance(result, dict):
            for metric, value in result.items():
                self.emit(metric, value)
        elif isinstance(result, (list, tuple)) and all(
            isinstance(item, tuple) and len(item) == 2 for item in result
        ):
            for metric, value in result:
                self.emit(metric, value)
        elif self.options.metric:
            self.emit(self.options.metric, result)
        else:
            self.bad_input(
                f"the function returned a single {type(result).__name__} but the adapter has "
                "no 'metric' option to name it"
            )

    def health_extra(self) -> dict[str, Any]:
        return {"calls": self.calls, "late_ticks": self.late_ticks}
