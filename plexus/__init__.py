"""plexus: deliver telemetry from CAN, MQTT, MAVLink, serial and Python code to Plexus.

    from plexus import Plexus
    with Plexus() as px:
        px.send("temperature", 72.5)
"""

from __future__ import annotations

import pluggy

from plexus.client import Plexus
from plexus.commands import Cancelled, Run
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
    RetryableSinkError,
    SinkError,
    ValidationError,
)
from plexus.uploader import RetryPolicy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@plexus.hookimpl``.
hookimpl = pluggy.HookimplMarker("plexus")

__all__ = [
    "AdapterError",
    "AuthenticationError",
    "BufferingError",
    "Cancelled",
    "ClientClosedError",
    "CommandDeclarationError",
    "ConfigError",
    "DeliveryError",
    "Plexus",
    "PlexusError",
    "PluginError",
    "PointTypeError",
    "RetryPolicy",
    "RetryableSinkError",
    "Run",
    "SinkError",
    "ValidationError",
    "__version__",
    "hookimpl",
]
