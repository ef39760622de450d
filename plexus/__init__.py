"""plexus: deliver telemetry from CAN, MQTT, MAVLink, serial and Python code to Plexus.

    from plexus import Plexus
    with Plexus() as px:
        px.send("temperature", 72.5)
"""

from __future__ import annotations

import pluggy

from plexus.batching import BatchSender
from plexus.client import Plexus
from plexus.commands import Cancelled, ParamError, Run
from plexus.errors import (
    AdapterError,
    AuthenticationError,
    BufferingError,
    ClientClosedError,
    CommandDeclarationError,
    ConfigError,
    DeliveryError,
    PlexusError,
    PluginError,
    PointTypeError,
    RateLimitedError,
    RetryableSinkError,
    SinkError,
    UnsupportedError,
    ValidationError,
)
from plexus.sdk_compat import RetryConfig
from plexus.uploader import RetryPolicy

# The official SDK's names for two of ours, so its users' imports keep working.
CommandParamError = ParamError
CommandRun = Run

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@plexus.hookimpl``.
hookimpl = pluggy.HookimplMarker("plexus")

__all__ = [
    "AdapterError",
    "AuthenticationError",
    "BatchSender",
    "BufferingError",
    "Cancelled",
    "ClientClosedError",
    "CommandDeclarationError",
    "CommandParamError",
    "CommandRun",
    "ConfigError",
    "DeliveryError",
    "Plexus",
    "PlexusError",
    "PluginError",
    "PointTypeError",
    "RateLimitedError",
    "RetryConfig",
    "RetryPolicy",
    "RetryableSinkError",
    "Run",
    "SinkError",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "hookimpl",
]
