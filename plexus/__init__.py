"""plexus: deliver telemetry from CAN, MQTT, MAVLink, serial and Python code to Plexus.

    from plexus import Plexus
    with Plexus() as px:
        px.send("temperature", 72.5)

Everything a plugin needs is importable from here too (docs/plugins.md):
``hookimpl``, ``Adapter``, ``ThreadedAdapter``, ``Sink``, ``SendResult``,
``Batch``, ``PointCodec``, ``Point``, ``require``, ``OptionsModel``,
``option``, ``InvalidOptions``, ``declared_problems``, ``cannot_write`` and
the errors. ``OptionsModel`` and ``option`` import pydantic, so they are
loaded on first use: ``import plexus`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from plexus.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterHealth,
    ThreadedAdapter,
    describe_error,
    require,
)
from plexus.batching import BatchSender
from plexus.buffer import Batch
from plexus.client import Plexus
from plexus.codec import PointCodec
from plexus.commands import Cancelled, ParamError, Run
from plexus.errors import (
    AdapterError,
    AuthenticationError,
    BufferingError,
    ClientClosedError,
    CommandDeclarationError,
    ConfigError,
    DeliveryError,
    InvalidOptions,
    PlexusError,
    PluginError,
    PointTypeError,
    RateLimitedError,
    RetryableSinkError,
    SinkError,
    UnsupportedError,
    ValidationError,
)
from plexus.optioncheck import declared_problems
from plexus.point import Point
from plexus.sdk_compat import RetryConfig
from plexus.sinks.base import SendResult, Sink
from plexus.uploader import RetryPolicy
from plexus.writable import cannot_write

if TYPE_CHECKING:
    from plexus.config.options import OptionsModel, option

# The official SDK's names for two of ours, so its users' imports keep working.
CommandParamError = ParamError
CommandRun = Run

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@plexus.hookimpl``.
hookimpl = pluggy.HookimplMarker("plexus")

_LAZY = {"OptionsModel": "plexus.config.options", "option": "plexus.config.options"}


def __getattr__(name: str) -> Any:
    # pydantic costs ~100 ms to import; only a plugin's options need it.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plexus' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Adapter",
    "AdapterContext",
    "AdapterError",
    "AdapterHealth",
    "AuthenticationError",
    "Batch",
    "BatchSender",
    "BufferingError",
    "Cancelled",
    "ClientClosedError",
    "CommandDeclarationError",
    "CommandParamError",
    "CommandRun",
    "ConfigError",
    "DeliveryError",
    "InvalidOptions",
    "OptionsModel",
    "Plexus",
    "PlexusError",
    "PluginError",
    "Point",
    "PointCodec",
    "PointTypeError",
    "RateLimitedError",
    "RetryConfig",
    "RetryPolicy",
    "RetryableSinkError",
    "Run",
    "SendResult",
    "Sink",
    "SinkError",
    "ThreadedAdapter",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "cannot_write",
    "declared_problems",
    "describe_error",
    "hookimpl",
    "option",
    "require",
]
