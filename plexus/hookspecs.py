"""The hooks a plexus plugin can implement (pluggy project name ``plexus``).

A plugin is a module listed under the ``plexus`` entry-point group::

    [project.entry-points.plexus]
    hostmetrics = "plexus_hostmetrics"

that implements any of these hooks with ``@plexus.hookimpl``::

    from plexus import hookimpl

    @hookimpl
    def plexus_register_adapters(register):
        register(HostMetricsAdapter)

Built-in adapters and sinks are registered through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("plexus")


@hookspec
def plexus_register_adapters(register: Callable[[type[Any]], None]) -> None:
    """Register adapter (source) classes.

    Call ``register(cls)`` once per class. ``cls`` subclasses
    ``plexus.adapters.base.Adapter`` and sets ``type_name`` (the ``type:`` in
    the rig file; snake_case, unique) and ``Options`` (a dataclass of its
    options). A duplicate or invalid registration is reported and skipped.
    """


@hookspec
def plexus_register_sinks(register: Callable[[type[Any]], None]) -> None:
    """Register sink classes (subclasses of ``plexus.sinks.base.Sink``), as above."""
