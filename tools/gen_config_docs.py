"""Regenerate what is generated from the code: the option tables of
docs/configuration.md and configs/rig.schema.json (built-in types only).

    python tools/gen_config_docs.py

Everything above the ``<!-- generated -->`` marker is kept as written.
"""

from __future__ import annotations

import json
from pathlib import Path

from plexus.cli import options_markdown
from plexus.config.schema import rig_schema
from plexus.plugins import load_plugins

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SCHEMA = ROOT / "configs" / "rig.schema.json"


def builtin_types() -> tuple[dict[str, type], dict[str, type], list[str]]:
    registry = load_plugins()
    builtin = sorted(name for (_kind, name), provider in registry.providers.items()
                     if provider.package == "plexus-gateway")
    adapters = {k: v for k, v in registry.adapters.items() if k in builtin}
    sinks = {k: v for k, v in registry.sinks.items() if k in builtin}
    return adapters, sinks, builtin


def schema_text() -> str:
    adapters, sinks, _ = builtin_types()
    return json.dumps(rig_schema(adapters, sinks), indent=2) + "\n"


def main() -> None:
    registry = load_plugins()
    _, _, builtin = builtin_types()
    head = DOC.read_text().split("<!-- generated -->")[0]
    DOC.write_text(head + "<!-- generated -->\n\n"
                   + options_markdown(registry, builtin, top_level=True) + "\n")
    SCHEMA.write_text(schema_text())


if __name__ == "__main__":
    main()
