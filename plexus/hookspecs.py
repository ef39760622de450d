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
    ``plexus.Adapter`` (usually ``plexus.ThreadedAdapter``) and sets
    ``type_name`` (the ``type:`` in the rig file; snake_case) and ``Options``
    (its options: a ``plexus.OptionsModel`` or a dataclass). An invalid
    registration is reported and skipped. A name another package registers
    too must be chosen in the rig as ``name@package`` (docs/plugins.md).
    """


@hookspec
def plexus_register_sinks(register: Callable[[type[Any]], None]) -> None:
    """Register sink classes (subclasses of ``plexus.Sink``), as above."""


@hookspec
def plexus_register_commands(register: Callable[[Any], None], control: Any) -> None:
    """Register remote commands the dashboard can run on a gateway.

    Called when a rig turns commands on (``commands: {enabled: true}``).
    Call ``register(cmd)`` once per :class:`plexus.commands.Command` (build
    it with ``@plexus.commands.command(...)``); ``control`` is the running
    gateway as commands see it (:class:`plexus.control.Control`: its
    adapters, ``emit``...). A hook may take only ``register``. An invalid or
    duplicate command is reported (``--check`` lists it) and skipped.
    """
