"""Regenerate the option tables of docs/configuration.md from the code.

    python tools/gen_config_docs.py

Everything above the ``<!-- generated -->`` marker is kept as written.
"""

from __future__ import annotations

from pathlib import Path

from plexus.cli import options_markdown
from plexus.plugins import load_plugins

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> None:
    registry = load_plugins()
    builtin = sorted(name for (_kind, name), provider in registry.providers.items()
                     if provider.package == "plexus-gateway")
    head = DOC.read_text().split("<!-- generated -->")[0]
    DOC.write_text(head + "<!-- generated -->\n\n"
                   + options_markdown(registry, builtin, top_level=True) + "\n")


if __name__ == "__main__":
    main()
