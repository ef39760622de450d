"""Remote commands: declarations, parameter checks, runs and their statuses.

This module knows nothing of sockets, adapters or sinks. A
:class:`CommandCenter` takes the platform's command frames in
(:meth:`CommandCenter.handle`) and gives status frames out through the
``send`` callable the device link hands it (:meth:`CommandCenter.attach`).

Two generations of the wire protocol are spoken:

- **Declared commands** (protocol 1, the hosted platform): a command is
  declared with a name, typed parameters, a danger level and an expiry, and
  announced when the link opens. The platform sends ``command_run``; the
  device answers with ``command_status`` frames numbered 1, 2, 3...
  (``acknowledged``, ``running``, any ``progress``, then ``succeeded`` or
  ``failed``). Statuses other than progress are kept until the platform
  acknowledges them and replayed after a reconnect.
- **Legacy commands** (``typed_command`` / ``command_result``, the
  open-source gateway): answered with an ``ack`` at once, then a ``result``
  or an ``error``. Handlers registered with :meth:`CommandCenter.add_legacy`
  answer them, and so does every declared command (its parameters checked
  the same way), so a dashboard of either generation reaches the same code.

Handlers run on their own threads, never on the link's.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from plexus.errors import CommandDeclarationError

log = logging.getLogger(__name__)

__all__ = [
    "Cancelled",
    "Command",
    "CommandCenter",
    "CommandFailed",
    "ParamError",
    "Run",
    "coerce_params",
    "command",
    "declare",
    "redact",
]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
DANGERS = ("normal", "dangerous", "critical")
CONCURRENCY = ("accept", "reject")
TYPES = ("string", "integer", "number", "boolean")
MAX_PARAMS = 16
MAX_ENUM = 64
MIN_EXPIRES_S = 5.0
MAX_EXPIRES_S = 3600.0
DEFAULT_EXPIRES_S = 30.0
#: A status frame never exceeds this (or the server's smaller ``max_frame_bytes``).
STATUS_FRAME_LIMIT = 64 * 1024
#: A legacy ``command_result`` larger than this is replaced by an error event.
LEGACY_FRAME_LIMIT = 1024 * 1024 - 1024
#: Statuses waiting for the platform's acknowledgement, at most.
KEPT_STATUSES = 256
#: Runs whose last status is remembered (a redelivery gets it again).
REMEMBERED_RUNS = 256
#: Run ids remembered so that none runs twice.
SEEN_RUN_IDS = 4096
PROGRESS_INTERVAL_S = 1.0
#: Handler threads running at once; a run beyond this is refused as ``busy``.
MAX_RUNNING = 64
#: The expiry watchdog thread ends after this long with no run to watch.
WATCHDOG_IDLE_S = 5.0
#: The watchdog reads the clock again at least this often: an injected clock may jump.
WATCHDOG_SLICE_S = 0.5
FINAL_STATES = frozenset({"succeeded", "failed"})

_COMMON_KEYWORDS = frozenset({"type", "title", "description", "default", "required"})
_TYPE_KEYWORDS = {
    "string": frozenset({"maxLength", "enum"}),
    "integer": frozenset({"minimum", "maximum", "unit"}),
    "number": frozenset({"minimum", "maximum", "unit"}),
    "boolean": frozenset(),
}
_SECRET_NAME = re.compile(r"(key|secret|token|passw|credential|auth)", re.IGNORECASE)


class Cancelled(Exception):  # noqa: N818 - the name a handler author reads: raise Cancelled
    """Raise from a handler to end its run as ``failed`` with error code ``cancelled``."""


class CommandFailed(Exception):  # noqa: N818 - reads as an outcome: raise CommandFailed(...)
    """Raise from a handler to fail its run with a chosen ``error_code`` and message
    (``bad_params``, ``not_found``, ``refused``, ``timeout``...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ParamError(ValueError):
    """A run's parameters break its command's declaration (``bad_params``)."""


# --------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class Command:
    """A declared command: a name, typed parameters, and the handler that runs it.

    Build one with :func:`declare` or the :func:`command` decorator, which
    check every rule; the handler is called as ``handler(run, **params)``.

    Attributes:
        moves_vehicle: the command can move a vehicle; the gateway refuses it
            unless the rig's ``commands.allow`` names it explicitly. Not sent
            to the platform.
    """

    name: str
    handler: Callable[..., Any]
    params: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    title: str | None = None
    description: str | None = None
    danger: str = "normal"
    idempotent: bool = False
    expires_in: float = DEFAULT_EXPIRES_S
    concurrency: str = "accept"
    moves_vehicle: bool = False

    def manifest(self) -> dict[str, Any]:
        """The entry announced in ``device_auth.commands``."""
        entry: dict[str, Any] = {
            "name": self.name,
            "params": {name: dict(spec) for name, spec in self.params.items()},
            "danger": self.danger,
            "idempotent": self.idempotent,
            "expires_in_s": float(self.expires_in),
            "concurrency": self.concurrency,
        }
        if self.title is not None:
            entry["title"] = self.title
        if self.description is not None:
            entry["description"] = self.description
        return entry

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(*args, **kwargs)


def declare(
    name: str,
    handler: Callable[..., Any],
    *,
    title: str | None = None,
    description: str | None = None,
    danger: str = "normal",
    idempotent: bool = False,
    expires_in: float = DEFAULT_EXPIRES_S,
    concurrency: str = "accept",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    moves_vehicle: bool = False,
) -> Command:
    """Check a command's declaration and return it.

    Parameters:
        name: ``^[a-z][a-z0-9_]{0,63}$``.
        handler: called as ``handler(run, **params)`` on its own thread.
        title, description: shown on the dashboard.
        danger: ``normal``, ``dangerous`` or ``critical`` (the dashboard
            asks for confirmation accordingly).
        idempotent: safe to run again; the platform redelivers only such runs
            after a dropped link.
        expires_in: seconds, 5 to 3600, after which a run not yet started is
            dropped by the platform.
        concurrency: ``accept`` (runs overlap) or ``reject`` (a second run
            while one is active fails as ``busy``).
        params: at most 16 ``name -> spec``; a spec has ``type`` (string,
            integer, number, boolean), optional ``title``, ``description``,
            ``default`` or ``required: false``; strings may add
            ``maxLength`` and ``enum``, numbers ``minimum``, ``maximum`` and
            ``unit``.
        moves_vehicle: see :class:`Command`.

    Raises:
        CommandDeclarationError: (a ValueError) naming the rule broken.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise CommandDeclarationError(
            f"command name {name!r} is invalid: use lower-case letters, digits and '_', "
            f"starting with a letter, at most 64 characters (pattern {NAME_PATTERN.pattern})"
        )
    where = f"command {name!r}"
    if not callable(handler):
        raise CommandDeclarationError(f"{where}: the handler must be callable, got {handler!r}")
    for label, text in (("title", title), ("description", description)):
        if text is not None and not isinstance(text, str):
            raise CommandDeclarationError(f"{where}: {label} must be a string, got {text!r}")
    if danger not in DANGERS:
        raise CommandDeclarationError(
            f"{where}: danger must be one of {', '.join(DANGERS)}, got {danger!r}")
    if not isinstance(idempotent, bool):
        raise CommandDeclarationError(f"{where}: idempotent must be true or false")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not (
            MIN_EXPIRES_S <= expires_in <= MAX_EXPIRES_S):
        raise CommandDeclarationError(
            f"{where}: expires_in must be {MIN_EXPIRES_S:g} to {MAX_EXPIRES_S:g} seconds, "
            f"got {expires_in!r}")
    if concurrency not in CONCURRENCY:
        raise CommandDeclarationError(
            f"{where}: concurrency must be accept or reject, got {concurrency!r}")
    raw = {} if params is None else params
    if not isinstance(raw, Mapping):
        raise CommandDeclarationError(f"{where}: params must be a mapping of name to spec")
    if len(raw) > MAX_PARAMS:
        raise CommandDeclarationError(
            f"{where}: at most {MAX_PARAMS} parameters, got {len(raw)}")
    checked = {pname: _check_spec(where, pname, spec) for pname, spec in raw.items()}
    _check_handler_accepts(where, handler, checked)
    return Command(name, handler, checked, title, description, danger, idempotent,
                   float(expires_in), concurrency, moves_vehicle)


def command(name: str, **options: Any) -> Callable[[Callable[..., Any]], Command]:
    """Decorator form of :func:`declare`: ``@command("reboot", danger="critical")``.

    The decorated function becomes a :class:`Command` (still callable) that
    a plugin passes to ``register`` in ``plexus_register_commands``.
    """

    def wrap(handler: Callable[..., Any]) -> Command:
        return declare(name, handler, **options)

    return wrap


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_spec(where: str, pname: Any, spec: Any) -> dict[str, Any]:
    if not isinstance(pname, str) or not NAME_PATTERN.match(pname):
        raise CommandDeclarationError(
            f"{where}: parameter name {pname!r} is invalid: use lower-case letters, digits "
            f"and '_', starting with a letter (pattern {NAME_PATTERN.pattern})")
    at = f"{where}: parameter {pname!r}"
    if not isinstance(spec, Mapping):
        raise CommandDeclarationError(f"{at}: the spec must be a mapping, got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise CommandDeclarationError(
            f"{at}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - _COMMON_KEYWORDS - _TYPE_KEYWORDS[kind])
    if unknown:
        allowed = sorted(_COMMON_KEYWORDS | _TYPE_KEYWORDS[kind])
        raise CommandDeclarationError(
            f"{at}: unknown keyword(s) {', '.join(unknown)} for type {kind} "
            f"(allowed: {', '.join(allowed)})")
    for label in ("title", "description", "unit"):
        if label in spec and not isinstance(spec[label], str):
            raise CommandDeclarationError(f"{at}: {label} must be a string")
    if kind == "string":
        if "maxLength" in spec:
            limit = spec["maxLength"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise CommandDeclarationError(f"{at}: maxLength must be an integer >= 1")
        if "enum" in spec:
            choices = spec["enum"]
            if (not isinstance(choices, (list, tuple)) or not 1 <= len(choices) <= MAX_ENUM
                    or not all(isinstance(c, str) for c in choices)):
                raise CommandDeclarationError(
                    f"{at}: enum must be a list of 1 to {MAX_ENUM} strings")
    if kind in ("integer", "number"):
        for label in ("minimum", "maximum"):
            if label in spec and not _is_number(spec[label]):
                raise CommandDeclarationError(f"{at}: {label} must be a number")
        if "minimum" in spec and "maximum" in spec and spec["minimum"] > spec["maximum"]:
            raise CommandDeclarationError(f"{at}: minimum is greater than maximum")
    if "required" in spec:
        if not isinstance(spec["required"], bool):
            raise CommandDeclarationError(f"{at}: required must be true or false")
        if "default" in spec:
            raise CommandDeclarationError(
                f"{at}: give either a default or required, not both (a default makes it "
                "optional)")
    out = dict(spec)
    if "enum" in out:
        out["enum"] = list(out["enum"])
    if "default" in spec:
        try:
            value = _coerce_strict(kind, spec["default"])
            _check_constraints(pname, out, value)
        except ParamError as exc:
            raise CommandDeclarationError(f"{at}: the default is invalid: {exc}") from None
    out["required"] = bool(spec.get("required", "default" not in spec))
    return out


def _coerce_strict(kind: str, value: Any) -> Any:
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": _is_number(value),
        "boolean": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ParamError(f"expected {_a(kind)}, got {_json_kind(value)}")
    return value


def _check_handler_accepts(where: str, handler: Callable[..., Any],
                           params: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    try:
        signature.bind(None, **{name: None for name in params})
    except TypeError as exc:
        raise CommandDeclarationError(
            f"{where}: the handler cannot be called as handler(run, "
            f"{', '.join(f'{n}=...' for n in params)}): {exc}") from None


# --------------------------------------------------------------------------
# Parameters


def coerce_params(specs: Mapping[str, Mapping[str, Any]], params: Any, *,
                  objects_as_json: bool = False) -> dict[str, Any]:
    """Check and convert a run's ``params`` against the command's specs.

    ``null`` params mean ``{}`` and a ``null`` value counts as absent;
    unknown names are refused; defaults are filled in; an optional parameter
    with no default is left out. ``integer`` takes an int, an integral float
    or a numeric string; ``number`` the same and always yields a float;
    ``boolean`` a bool, ``"true"``/``"false"`` (any case) or 0/1; a bool is
    never a number. Ranges, ``maxLength`` and ``enum`` are checked after
    conversion. With ``objects_as_json`` (legacy frames, whose params are free
    JSON) an object or array given for a string parameter is passed as its
    JSON text.

    Raises:
        ParamError: the first problem, e.g. ``missing required parameter: x``.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ParamError(f"params must be an object, got {_json_kind(params)}")
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(str(k) for k in set(given) - set(specs))
    if unknown:
        raise ParamError(f"unknown parameter(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name not in given:
            if "default" in spec:
                out[name] = spec["default"]
            elif spec.get("required", True):
                raise ParamError(f"missing required parameter: {name}")
            continue
        value = _coerce(name, spec["type"], given[name], objects_as_json)
        _check_constraints(name, spec, value)
        out[name] = value
    return out


def _coerce(name: str, kind: str, value: Any, objects_as_json: bool) -> Any:
    if kind == "integer":
        if isinstance(value, bool):
            raise ParamError(f"{name} must be an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise ParamError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ParamError(f"{name} must be an integer, got {_show(value)}")
    if kind == "number":
        if isinstance(value, bool):
            raise ParamError(f"{name} must be a number, got a boolean")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ParamError(f"{name} must be a number, got {_show(value)}")
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ParamError(f"{name} must be true or false, got {_show(value)}")
    if isinstance(value, str):
        return value
    if objects_as_json and isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    raise ParamError(f"{name} must be a string, got {_json_kind(value)}")


def _check_constraints(name: str, spec: Mapping[str, Any], value: Any) -> None:
    if "minimum" in spec and value < spec["minimum"]:
        raise ParamError(f"{name} must be at least {spec['minimum']}, got {value}")
    if "maximum" in spec and value > spec["maximum"]:
        raise ParamError(f"{name} must be at most {spec['maximum']}, got {value}")
    if "maxLength" in spec and len(value) > spec["maxLength"]:
        raise ParamError(f"{name} must be at most {spec['maxLength']} characters, "
                         f"got {len(value)}")
    if "enum" in spec and value not in spec["enum"]:
        raise ParamError(f"{name} must be one of {', '.join(spec['enum'])}, got {value!r}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return repr(value)[:60]
    return _json_kind(value)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def redact(value: Any) -> Any:
    """A copy of params for logs and the audit file: values under secret-looking
    keys (key, secret, token, password, credential, auth) become ``'***'``."""
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and _SECRET_NAME.search(k) and v is not None
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        # A JSON object passed as text (configure's "config") hides its secrets too.
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        return orjson.dumps(redact(parsed)).decode()  # text opening with "{" parses to a dict
    return value


# --------------------------------------------------------------------------
# Runs


class Run:
    """One run of a command, handed to its handler as the first argument.

    Attributes:
        id: the run id (a legacy command's ``id``).
        command: the command's name.
        params: the checked parameters (also passed as keyword arguments).
        attempt: the platform's delivery attempt, from 1.
    """

    def __init__(self, center: CommandCenter, run_id: str, command: str,
                 params: dict[str, Any], attempt: int, legacy: bool) -> None:
        self.id = run_id
        self.command = command
        self.params = params
        self.attempt = attempt
        self.legacy = legacy
        self._center = center
        self._deadline: float | None = None  # set once the run is accepted
        self._cancel = threading.Event()
        self._last_progress: float | None = None
        self.seq = 0
        self.started = time.time()
        self.released = False
        self.final_frame: dict[str, Any] | None = None
        self.last_frame: dict[str, Any] | None = None

    @property
    def time_remaining(self) -> float | None:
        """Seconds left before the run expires (0 once past), or None without an expiry."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._center.clock())

    @property
    def cancel_requested(self) -> bool:
        """True once the run has expired or the client is closing: stop soon
        (raise :class:`Cancelled`); a result returned after that is discarded."""
        return self._cancel.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True at once if cancellation is requested."""
        return self._cancel.wait(seconds)

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress, 0 to 100 (clamped). At most one frame a second is
        sent, except 100, which always is; non-numbers are ignored. Progress
        never changes the run's state and is not replayed after a reconnect."""
        if not _is_number(percent) or not math.isfinite(percent):
            return
        value = float(min(100.0, max(0.0, percent)))
        now = self._center.clock()
        if value < 100.0 and self._last_progress is not None and (
                now - self._last_progress < PROGRESS_INTERVAL_S):
            return
        self._last_progress = now
        self._center._progress(self, value, message if isinstance(message, str) else None)

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, command={self.command!r}, attempt={self.attempt})"


@dataclass
class _Legacy:
    handler: Callable[[str, dict[str, Any]], Any]
    concurrency: str


def _result_object(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {"value": value}


def _encode(frame: dict[str, Any]) -> bytes | None:
    try:
        return orjson.dumps(frame, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return None


class CommandCenter:
    """Runs commands from frames and produces their status frames.

    Parameters:
        clock: the monotonic clock for expiries and progress pacing (tests
            inject their own).
        max_running: handler threads at once; more runs are refused as ``busy``.
        on_outcome: called with a record of every finished or refused run
            (the gateway's audit file).

    The link calls :meth:`attach` with its ``send`` when it authenticates and
    gets back the ``command_sync`` and replay frames to send first, calls
    :meth:`detach` when the connection ends, and passes every command frame
    to :meth:`handle`.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_running: int = MAX_RUNNING,
                 on_outcome: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.clock = clock
        self.max_running = max_running
        self.on_outcome = on_outcome
        self.commands: dict[str, Command] = {}
        self.legacy: dict[str, _Legacy] = {}
        self.refusals: dict[str, str] = {}
        self.max_frame_bytes = STATUS_FRAME_LIMIT
        self.store_results = True
        self.last: dict[str, Any] | None = None
        #: Bumped whenever the set of commands changes (the link re-announces).
        self.version = 0
        self.counts = {"runs": 0, "succeeded": 0, "failed": 0, "duplicates": 0}
        self._lock = threading.RLock()
        self._send: Callable[[dict[str, Any]], bool] | None = None
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._kept: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._active: dict[str, int] = {}
        self._running = 0
        self._deadlines: list[Run] = []
        self._watchdog: threading.Thread | None = None
        self._wake = threading.Condition(self._lock)
        self._closed = False

    # Registration --------------------------------------------------------
    def add(self, cmd: Command) -> None:
        """Declare a command; a second one with the same name is an error."""
        if not isinstance(cmd, Command):
            raise CommandDeclarationError(f"expected a Command (see plexus.commands.declare), "
                                          f"got {cmd!r}")
        with self._lock:
            if cmd.name in self.commands or cmd.name in self.legacy:
                raise CommandDeclarationError(f"command {cmd.name!r} is already declared")
            self.commands[cmd.name] = cmd
            self.version += 1

    def add_legacy(self, name: str, handler: Callable[[str, dict[str, Any]], Any],
                   concurrency: str = "accept") -> None:
        """Answer legacy ``typed_command`` frames named ``name`` with ``handler(command, params)``."""
        if not isinstance(name, str) or not name:
            raise CommandDeclarationError(f"a command name must be a non-empty string, got "
                                          f"{name!r}")
        if not callable(handler):
            raise CommandDeclarationError(f"command {name!r}: the handler must be callable")
        if concurrency not in CONCURRENCY:
            raise CommandDeclarationError(
                f"command {name!r}: concurrency must be accept or reject, got {concurrency!r}")
        with self._lock:
            if name in self.commands or name in self.legacy:
                raise CommandDeclarationError(f"command {name!r} is already declared")
            self.legacy[name] = _Legacy(handler, concurrency)
            self.version += 1

    def refuse(self, name: str, reason: str) -> None:
        """Answer runs of ``name`` with ``failed``/``not_allowed`` and ``reason``."""
        self.refusals[name] = reason
        self.version += 1

    def manifest(self) -> list[dict[str, Any]]:
        """The declared commands to announce (refused ones are left out)."""
        with self._lock:
            return [c.manifest() for name, c in sorted(self.commands.items())
                    if name not in self.refusals]

    @property
    def wants_link(self) -> bool:
        return bool(self.commands or self.legacy)

    # The link's side ----------------------------------------------------------
    def attach(self, send: Callable[[dict[str, Any]], bool], info: Mapping[str, Any],
               enable: Callable[[], None]) -> list[dict[str, Any]]:
        """The link is authenticated: return ``command_sync`` and the kept statuses
        to send first. ``enable`` (the link starting to accept frames) is called
        under this center's lock so no status slips between the replay and it."""
        limit: Any = info.get("max_frame_bytes")
        with self._lock:
            self.max_frame_bytes = (min(STATUS_FRAME_LIMIT, limit)
                                    if _is_number(limit) and limit > 0 else STATUS_FRAME_LIMIT)
            self.store_results = info.get("store_results") is not False
            frames: list[dict[str, Any]] = []
            if self._kept:
                latest: OrderedDict[str, dict[str, Any]] = OrderedDict()
                for (run_id, _seq), frame in self._kept.items():
                    latest[run_id] = {"run_id": run_id, "state": frame["state"],
                                      "seq": frame["seq"]}
                frames.append({"type": "command_sync", "runs": list(latest.values())})
                frames.extend(self._kept.values())
            self._send = send
            enable()
        return frames

    def detach(self) -> None:
        with self._lock:
            self._send = None

    def handle(self, frame: Mapping[str, Any]) -> bool:
        """Act on a command frame; False when ``frame`` is not one."""
        kind = frame.get("type")
        if kind == "command_run":
            self._on_run(frame)
        elif kind == "typed_command":
            self._on_typed(frame)
        elif kind == "command_status_ack":
            self._on_ack(frame)
        else:
            return False
        return True

    def close(self) -> None:
        """Ask every running handler to stop (``cancel_requested``); stop the watchdog."""
        with self._lock:
            self._closed = True
            for run in self._runs.values():
                run._cancel.set()
            self._send = None
            self._wake.notify_all()

    # Declared runs -------------------------------------------------------
    def _on_run(self, frame: Mapping[str, Any]) -> None:
        run_id = frame.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            log.debug("command_run without a run_id ignored")
            return
        name = frame.get("command")
        name = name if isinstance(name, str) else ""
        attempt = frame.get("attempt")
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
        with self._lock:
            if run_id in self._seen:
                self._redeliver(run_id, name)
                return
            self._remember(run_id)
            run = Run(self, run_id, name, {}, attempt, legacy=False)
            self._track(run)
            cmd = self.commands.get(name)
            if name in self.refusals:
                self._reject(run, "not_allowed", self.refusals[name], frame.get("params"))
                return
            if cmd is None:
                self._reject(run, "unknown_command", f"unknown command: {name}",
                             frame.get("params"))
                return
            try:
                run.params = coerce_params(cmd.params, frame.get("params"))
            except ParamError as exc:
                self._reject(run, "bad_params", str(exc), frame.get("params"))
                return
            ttl: Any = frame.get("ttl_ms")
            if _is_number(ttl):
                if ttl <= 0:
                    self._reject(run, "expired_on_arrival",
                                 f"the run expired before it arrived (ttl_ms {ttl})", run.params)
                    return
                run._deadline = self.clock() + ttl / 1000.0
            busy = self._busy_reason(name, cmd.concurrency)
            if busy:
                self._reject(run, "busy", busy, run.params)
                return
            self._status(run, "acknowledged")
            self._start(run, lambda: self._execute(run, cmd))

    def _redeliver(self, run_id: str, name: str) -> None:
        self.counts["duplicates"] += 1
        run = self._runs.get(run_id)
        log.info("command run %s (%s) delivered again; not run twice", run_id, name or "?")
        if run is None:
            ghost = Run(self, run_id, name, {}, 1, legacy=False)
            self._track(ghost)
            self._final(ghost, "failed", error_code="duplicate",
                        error_message="this run was already received and is no longer "
                                      "remembered")
            return
        source = run.final_frame or run.last_frame
        if source is None:
            self._final(run, "failed", error_code="duplicate",
                        error_message="this run was already received")
            return
        run.seq += 1
        again = {**source, "seq": run.seq}
        self._emit_status(run, again)

    def _busy_reason(self, name: str, concurrency: str) -> str | None:
        if concurrency == "reject" and self._active.get(name, 0) > 0:
            return f"command already in progress: {name}"
        if self._running >= self.max_running:
            return f"too many commands running at once ({self.max_running})"
        return None

    def _reject(self, run: Run, code: str, message: str, params: Any) -> None:
        run.params = params if isinstance(params, dict) else {}
        self._final(run, "failed", error_code=code, error_message=message)

    def _execute(self, run: Run, cmd: Command) -> None:
        self._status(run, "running")
        try:
            value = cmd.handler(run, **run.params)
        except Cancelled as exc:
            self._release(run)
            self._final(run, "failed", error_code="cancelled",
                        error_message=str(exc) or "cancelled by the handler")
        except CommandFailed as exc:
            self._release(run)
            self._final(run, "failed", error_code=exc.code, error_message=exc.message)
        except Exception as exc:
            log.debug("command %s raised", run.command, exc_info=True)
            self._release(run)
            self._final(run, "failed", error_code="handler_error",
                        error_message=f"{type(exc).__name__}: {exc}")
        else:
            self._release(run)
            self._final(run, "succeeded", result=_result_object(value))

    # Legacy runs ---------------------------------------------------------
    def _on_typed(self, frame: Mapping[str, Any]) -> None:
        cid = frame.get("id")
        cid = cid if isinstance(cid, str) else ""
        name = frame.get("command")
        name = name if isinstance(name, str) else ""
        base = {"type": "command_result", "id": cid, "command": name}
        raw = frame.get("params")
        with self._lock:
            self._send_legacy({**base, "event": "ack"})
            run = Run(self, cid, name, raw if isinstance(raw, dict) else {}, 1, legacy=True)
            if name in self.refusals:
                self._legacy_error(run, base, self.refusals[name], "not_allowed")
                return
            legacy = self.legacy.get(name)
            cmd = self.commands.get(name)
            if legacy is None and cmd is None:
                self._legacy_error(run, base, f"unknown command: {name}", "unknown_command")
                return
            if cmd is not None:
                params = dict(raw) if isinstance(raw, dict) else raw
                if isinstance(params, dict):
                    # The open-source gateway copies the source id into every command's params.
                    params.pop("source_id", None)
                try:
                    run.params = coerce_params(cmd.params, params, objects_as_json=True)
                except ParamError as exc:
                    self._legacy_error(run, base, f"bad_params: {exc}", "bad_params")
                    return
                run._deadline = self.clock() + cmd.expires_in
            concurrency = cmd.concurrency if cmd is not None else legacy.concurrency  # type: ignore[union-attr]
            if concurrency == "reject" and self._active.get(name, 0) > 0:
                self._legacy_error(run, base, f"command already in progress: {name}", "busy")
                return
            if self._running >= self.max_running:
                self._legacy_error(run, base, f"too many commands running at once "
                                              f"({self.max_running})", "busy")
                return
            self._track_legacy(run)
            if cmd is not None:
                self._start(run, lambda: self._execute_legacy_declared(run, cmd, base), base)
            else:
                assert legacy is not None
                self._start(run, lambda: self._execute_legacy(run, legacy, base), base)

    def _execute_legacy(self, run: Run, legacy: _Legacy, base: dict[str, Any]) -> None:
        try:
            value = legacy.handler(run.command, run.params)
        except Exception as exc:
            self._release(run)
            self._legacy_error(run, base, str(exc) or type(exc).__name__, "handler_error")
        else:
            self._release(run)
            self._legacy_result(run, base, {} if value is None else value)

    def _execute_legacy_declared(self, run: Run, cmd: Command, base: dict[str, Any]) -> None:
        try:
            value = cmd.handler(run, **run.params)
        except Cancelled as exc:
            self._release(run)
            self._legacy_error(run, base, f"cancelled: {str(exc) or 'cancelled by the handler'}",
                               "cancelled")
        except CommandFailed as exc:
            self._release(run)
            self._legacy_error(run, base, f"{exc.code}: {exc.message}", exc.code)
        except Exception as exc:
            self._release(run)
            self._legacy_error(run, base, f"{type(exc).__name__}: {exc}", "handler_error")
        else:
            self._release(run)
            self._legacy_result(run, base, _result_object(value))

    def _legacy_result(self, run: Run, base: dict[str, Any], value: Any) -> None:
        with self._lock:
            if run.final_frame is not None:
                self._late(run, "succeeded")
                return
            frame = {**base, "event": "result", "result": value}
            data = _encode(frame)
            if data is None:
                frame["result"] = {"value": repr(value)[:512]}
            elif len(data) > LEGACY_FRAME_LIMIT:
                self._legacy_error(run, base, f"result too large ({len(data)} bytes; the "
                                              "link carries at most 1 MiB)", "too_large")
                return
            run.final_frame = frame
            self._outcome(run, "succeeded", None, None)
            self._send_legacy(frame)

    def _legacy_error(self, run: Run, base: dict[str, Any], message: str, code: str) -> None:
        with self._lock:
            if run.final_frame is not None:
                self._late(run, "failed")
                return
            frame = {**base, "event": "error", "error": message}
            run.final_frame = frame
            self._outcome(run, "failed", code, message)
            self._send_legacy(frame)

    def _send_legacy(self, frame: dict[str, Any]) -> None:
        send = self._send
        if send is None or not send(frame):
            # The protocol keeps no legacy result across a reconnect.
            log.info("command result %s/%s dropped: the link is down", frame.get("command"),
                     frame.get("event"))

    def _track_legacy(self, run: Run) -> None:
        # Legacy ids are not run ids (no redelivery), but expiry needs the run known.
        if run._deadline is not None:
            self._deadlines.append(run)
            self._ensure_watchdog()

    # Shared machinery ----------------------------------------------------
    def _remember(self, run_id: str) -> None:
        self._seen[run_id] = None
        while len(self._seen) > SEEN_RUN_IDS:
            self._seen.popitem(last=False)

    def _track(self, run: Run) -> None:
        self._runs[run.id] = run
        while len(self._runs) > REMEMBERED_RUNS:
            old_id, old = next(iter(self._runs.items()))
            if old.final_frame is None:
                break  # still running: keep it (and the few after it) a while longer
            del self._runs[old_id]

    def _start(self, run: Run, target: Callable[[], None],
               legacy_base: dict[str, Any] | None = None) -> None:
        name = run.command
        self._active[name] = self._active.get(name, 0) + 1
        self._running += 1
        self.counts["runs"] += 1

        def main() -> None:
            try:
                target()
            finally:
                self._release(run)

        if run._deadline is not None and not run.legacy:
            self._deadlines.append(run)
            self._ensure_watchdog()
        try:
            threading.Thread(target=main, name=f"plexus-command:{name}", daemon=True).start()
        except RuntimeError as exc:  # the interpreter cannot start another thread
            self._release(run)
            if legacy_base is not None:
                self._legacy_error(run, legacy_base,
                                   f"failed to start command handler: {exc}", "busy")
            else:
                self._final(run, "failed", error_code="busy",
                            error_message=f"failed to start command handler: {exc}")

    def _release(self, run: Run) -> None:
        """The handler returned: its concurrency slot is free (once per run).

        Called before the final status goes out, so a client that runs the
        command again as soon as it sees the answer never finds it busy."""
        with self._lock:
            if run.released:
                return
            run.released = True
            self._active[run.command] -= 1
            self._running -= 1

    def _status(self, run: Run, state: str) -> None:
        with self._lock:
            if run.final_frame is not None:
                return
            run.seq += 1
            frame = {"type": "command_status", "run_id": run.id, "seq": run.seq,
                     "state": state}
            run.last_frame = frame
            self._emit_status(run, frame)

    def _progress(self, run: Run, percent: float, message: str | None) -> None:
        with self._lock:
            if run.legacy or run.final_frame is not None:
                return
            run.seq += 1
            frame: dict[str, Any] = {"type": "command_status", "run_id": run.id,
                                     "seq": run.seq, "state": "progress", "progress": percent}
            if message is not None:
                frame["message"] = message
            frame = self._fit(frame)  # drops the message when results are not stored
            send = self._send
            if send is not None:
                send(frame)  # never kept: a stale progress frame means nothing later

    def _final(self, run: Run, state: str, *, result: dict[str, Any] | None = None,
               error_code: str | None = None, error_message: str | None = None) -> None:
        with self._lock:
            if run.final_frame is not None:
                self._late(run, state)
                return
            run.seq += 1
            frame: dict[str, Any] = {"type": "command_status", "run_id": run.id,
                                     "seq": run.seq, "state": state}
            if result is not None:
                frame["result"] = result
            if error_code is not None:
                frame["error_code"] = error_code
            if error_message is not None:
                frame["error_message"] = error_message
            frame = self._fit(frame)
            run.final_frame = run.last_frame = frame
            # Audited before the platform hears of it: the record never lags the answer.
            self._outcome(run, state, error_code, error_message)
            self._emit_status(run, frame)

    def _late(self, run: Run, state: str) -> None:
        log.warning("command %s (run %s) finished (%s) after it had already been answered "
                    "(expired); the late outcome is discarded", run.command, run.id, state)

    def _fit(self, frame: dict[str, Any]) -> dict[str, Any]:
        if not self.store_results:
            for name in ("result", "error_message", "message"):
                frame.pop(name, None)
        data = _encode(frame)
        if data is None and "result" in frame:
            frame["result"] = {"value": repr(frame["result"])[:512]}
            data = _encode(frame)
        limit = self.max_frame_bytes
        if data is None or len(data) > limit:
            frame.pop("result", None)
            frame.pop("message", None)
            data = _encode(frame)
        if data is None or len(data) > limit:
            frame.pop("error_message", None)
        return frame

    def _emit_status(self, run: Run, frame: dict[str, Any]) -> None:
        self._kept[(run.id, frame["seq"])] = frame
        while len(self._kept) > KEPT_STATUSES:
            (old_run, old_seq), _ = self._kept.popitem(last=False)
            log.warning("more than %d command statuses await the platform's acknowledgement; "
                        "status %d of run %s is forgotten", KEPT_STATUSES, old_seq, old_run)
        send = self._send
        if send is not None:
            send(frame)

    def _on_ack(self, frame: Mapping[str, Any]) -> None:
        run_id: Any = frame.get("run_id")
        seq: Any = frame.get("seq")
        if not isinstance(run_id, str) or not _is_number(seq):
            return
        with self._lock:
            for key in [k for k in self._kept if k[0] == run_id and k[1] <= seq]:
                del self._kept[key]

    @property
    def kept(self) -> int:
        """Statuses waiting for the platform's acknowledgement."""
        return len(self._kept)

    def _outcome(self, run: Run, state: str, code: str | None, message: str | None) -> None:
        duration = round(time.time() - run.started, 3)
        self.counts["succeeded" if state == "succeeded" else "failed"] += 1
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "run_id": run.id, "command": run.command, "params": redact(run.params),
            "via": "typed_command" if run.legacy else "command_run", "attempt": run.attempt,
            "outcome": state, "error_code": code, "message": message,
            "duration_s": duration,
        }
        self.last = {"command": run.command, "outcome": state if code is None
                     else f"{state} ({code})", "at": time.time()}
        level = logging.INFO if state == "succeeded" else logging.WARNING
        log.log(level, "command %s %s: %s%s", run.command,
                orjson.dumps(record["params"], default=repr).decode(), state,
                f" ({code}: {message})" if code else "")
        if self.on_outcome is not None:
            try:
                self.on_outcome(record)
            except Exception as exc:  # auditing must never stop a command's answer
                log.error("recording the outcome of command %s failed: %s", run.command, exc)

    # Expiry --------------------------------------------------------------
    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name="plexus-command-expiry",
                                              daemon=True)
            self._watchdog.start()
        self._wake.notify_all()

    def check_deadlines(self) -> None:
        """Answer every run past its expiry that has no final status yet."""
        now = self.clock()
        with self._lock:
            due = [r for r in self._deadlines if r._deadline is not None and r._deadline <= now]
            self._deadlines = [r for r in self._deadlines if r not in due]
            for run in due:
                if run.final_frame is not None:
                    continue
                run._cancel.set()
                message = ("no result before the run expired; the handler was asked to stop "
                           "and a late result will be discarded")
                if run.legacy:
                    base = {"type": "command_result", "id": run.id, "command": run.command}
                    self._legacy_error(run, base, f"timeout: {message}", "timeout")
                else:
                    self._final(run, "failed", error_code="timeout", error_message=message)

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                pending = [r._deadline for r in self._deadlines
                           if r._deadline is not None and r.final_frame is None]
                self._deadlines = [r for r in self._deadlines if r.final_frame is None]
                if not pending:
                    if not self._wake.wait(WATCHDOG_IDLE_S) and not self._deadlines:
                        self._watchdog = None
                        return
                    continue
                wait = min(pending) - self.clock()
                if wait > 0:
                    self._wake.wait(min(wait, WATCHDOG_SLICE_S))
                self.check_deadlines()
