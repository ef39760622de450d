"""The gateway's YAML rig file: load it, interpolate ``${ENV}``, validate it.

A rig file is one YAML mapping. Top-level keys are the gateway's settings
(see :class:`GatewaySettings`, or ``describe_options(GatewaySettings)``);
``adapters`` and ``sinks`` are lists of entries, each naming a registered
``type`` plus that type's options::

    source_id: rover-7
    api_key: ${PLEXUS_API_KEY}          # keep the key out of the file
    tags: {vehicle: rover-7}
    buffer: {type: sqlite}
    batch: {size: 500, interval: 2}
    adapters:
      - type: mqtt                      # a registered adapter type (required)
        name: telemetry                 # optional, unique in the file; default: the type
        tags: {bus: main}               # optional tags for this adapter's points
        host: ${MQTT_HOST:-localhost}   # every other key is an option of the type
        port: ${MQTT_PORT:-1883}        # a plain, whole ${...} is re-typed: the int 1883
    sinks:                              # optional; empty means the gateway's default
      - type: stdout

Interpolation, in every string value (keys are never interpolated):
``${NAME}`` is the environment variable (an error when unset),
``${NAME:-default}`` falls back to ``default`` when it is unset or empty (as
in the shell), and ``$${`` is a literal ``${``. A plain (unquoted) scalar that
is exactly one ``${...}`` is then typed like any YAML scalar, so ``1883``
becomes an int and ``true`` a bool; a quoted one stays a string. Inside a
flow mapping (``{...}``) YAML reads ``{`` as syntax, so a reference there must
be quoted (and so stays a string): use block style for typed references.

Errors never stop at the first: every problem in the file is collected and
raised as one :class:`ConfigErrors`, one problem per line, each in the form
``{file}:{line}: {key path}: {problem}``::

    rig.yaml:14: adapters[2].interval: expected a number, got 'fast'

Option types come from options classes (an adapter's or sink's ``Options``:
a pydantic model or a plain dataclass, validated by pydantic v2; see
:mod:`plexus.config.options`); :func:`build_options` validates a mapping
against one.

The package, where a reader would look for each part:

- :mod:`~plexus.config.problems`: ``file:line: key.path: problem``, and how
  types and values are named in messages;
- :mod:`~plexus.config.yamlfile`: YAML with line marks and ``${ENV}``;
- :mod:`~plexus.config.options`: declaring options, validating them with
  pydantic, translating its errors into ours;
- :mod:`~plexus.config.settings`: the gateway's top-level settings;
- :mod:`~plexus.config.rig`: the whole file, adapters and sinks included;
- :mod:`~plexus.config.schema`: the JSON Schema of rig files.
"""

from __future__ import annotations

from plexus.config.options import (
    Check,
    FieldSpec,
    OptionsModel,
    at_least,
    between,
    build_options,
    describe_options,
    field_specs,
    greater_than,
    one_of,
    option,
)
from plexus.config.problems import ConfigErrors, ConfigProblem, Where
from plexus.config.rig import ComponentConfig, RigConfig, load_config, load_config_text
from plexus.config.settings import (
    BatchConfig,
    BufferConfig,
    GatewaySettings,
    LocalReceiverConfig,
    RetrySettings,
)

# The official SDK's RetryConfig, where code written for its earlier versions
# imports it from (the rig's retry section is RetrySettings).
from plexus.sdk_compat import RetryConfig  # noqa: E402

__all__ = [
    "BatchConfig",
    "BufferConfig",
    "Check",
    "ComponentConfig",
    "ConfigErrors",
    "ConfigProblem",
    "FieldSpec",
    "GatewaySettings",
    "LocalReceiverConfig",
    "OptionsModel",
    "RetryConfig",
    "RetrySettings",
    "RigConfig",
    "Where",
    "at_least",
    "between",
    "build_options",
    "describe_options",
    "field_specs",
    "greater_than",
    "load_config",
    "load_config_text",
    "one_of",
    "option",
]
