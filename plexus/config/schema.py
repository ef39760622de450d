"""The JSON Schema of rig files, so editors complete and check them as they are typed.

``plexus-gateway schema`` prints it for the adapter and sink types installed
(plugins included). Start a rig file with::

    # yaml-language-server: $schema=rig.schema.json

and an editor with the YAML language server (VS Code's YAML extension,
Neovim, Helix...) offers every key with its help, and marks a wrong type, an
unknown key or a value out of its limits. The loader stays the judge: some
rules (a ``${VAR}`` standing for a number, cross-field checks) only it knows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter

from plexus.config.options import field_specs
from plexus.config.settings import GatewaySettings
from plexus.upload_rules import UploadRules

__all__ = ["rig_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def rig_schema(adapter_types: Mapping[str, type], sink_types: Mapping[str, type]) -> dict[str, Any]:
    """The JSON Schema of a rig file with these adapter and sink types."""
    defs: dict[str, Any] = {}
    top = _options_schema(GatewaySettings, defs, "settings")
    top.pop("title", None)
    top["properties"]["adapters"] = {
        "type": "array",
        "description": "Sources: each a mapping with type, optional name and tags, and the "
                       "type's options.",
        "items": {"anyOf": [_entry(cls, name, defs, f"adapter.{name}")
                            for name, cls in _types(adapter_types)]},
    }
    upload = _options_schema(UploadRules, defs, "upload")
    upload["description"] = ("Upload rules of this sink: a byte budget, metrics held while a "
                             "condition holds.")
    defs["upload"] = upload
    top["properties"]["sinks"] = {
        "type": "array",
        "description": "Destinations, written like adapters. Default: the Plexus platform.",
        "items": {"anyOf": [_entry(cls, name, defs, f"sink.{name}", upload=True)
                            for name, cls in _types(sink_types)]},
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "plexus-gateway rig file",
        "description": "A rig file of plexus-gateway: its settings, adapters and sinks.",
        **top,
        "$defs": dict(sorted(defs.items())),
    }


def _types(types: Mapping[str, type]) -> list[tuple[str, type]]:
    """The names a rig may write: bare, and ``name@package`` where packages share a name."""
    qualified = getattr(types, "qualified", None)  # a plugin registry's TypeTable
    return sorted([*types.items(), *(qualified().items() if qualified else [])])


def _entry(cls: type, type_name: str, defs: dict[str, Any], prefix: str,
           upload: bool = False) -> dict[str, Any]:
    schema = _options_schema(cls.Options, defs, prefix)  # type: ignore[attr-defined]
    doc = (cls.__doc__ or "").strip().splitlines()
    properties = {
        "type": {"const": type_name, "description": f"The {type_name!r} type."},
        "name": {"type": "string", "minLength": 1,
                 "description": "Unique in the file; default: the type, then type-2..."},
        "tags": {"type": "object", "additionalProperties": {"type": "string"},
                 "description": "Tags added to this entry's points."},
        **({"upload": {"$ref": "#/$defs/upload"}} if upload else {}),
        **schema.get("properties", {}),
    }
    entry: dict[str, Any] = {
        "title": type_name,
        "type": "object",
        "properties": properties,
        "required": ["type", *schema.get("required", [])],
        "additionalProperties": False,
    }
    if doc:
        entry["description"] = doc[0]
    return entry


def _options_schema(cls: type, defs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The schema of one options class; its nested definitions go into ``defs``."""
    schema = copy.deepcopy(TypeAdapter(cls).json_schema(mode="validation"))
    local = schema.pop("$defs", {})
    renames = {name: f"{prefix}.{name}" for name in local}
    schema = _rewrite_refs(schema, renames)
    _describe(schema, cls)
    for name, definition in local.items():
        definition = _rewrite_refs(definition, renames)
        defs[renames[name]] = definition
    for definition in [schema, *(defs[renames[name]] for name in local)]:
        if definition.get("type") == "object" and "properties" in definition:
            definition["additionalProperties"] = False
            for name, prop in definition["properties"].items():
                definition["properties"][name] = _allow_reference(prop)
    return schema


#: ``${NAME}`` or ``${NAME:-default}``: the loader interpolates it, then checks the type.
ENV_REFERENCE = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$",
                 "description": "an environment variable, typed after interpolation"}


def _allow_reference(prop: dict[str, Any]) -> dict[str, Any]:
    """Let a number or boolean key hold ``${VAR}``, as a rig file may (``port: ${PORT}``)."""
    kinds = {prop.get("type")} | {item.get("type") for item in prop.get("anyOf", [])}
    if not kinds & {"integer", "number", "boolean"}:
        return prop
    keep: dict[str, Any] = {k: prop[k] for k in ("title", "description", "default", "writeOnly")
                            if k in prop}
    typed = {k: v for k, v in prop.items() if k not in keep}
    return {**keep, "anyOf": [typed, ENV_REFERENCE]}


def _describe(schema: dict[str, Any], cls: type) -> None:
    """Help and limits of dataclass fields (pydantic reads only a model's own)."""
    for name, spec in field_specs(cls).items():
        prop = schema.get("properties", {}).get(name)
        if prop is None:
            continue
        if spec.help and "description" not in prop:
            prop["description"] = spec.help
        if spec.secret:
            prop["writeOnly"] = True
        # Limits written in metadata={"gt": 0}, unseen by pydantic's JSON Schema.
        for target in [prop, *prop.get("anyOf", [])]:
            if target.get("type") not in ("number", "integer"):
                continue
            for key, keyword in (("gt", "exclusiveMinimum"), ("ge", "minimum"),
                                 ("lt", "exclusiveMaximum"), ("le", "maximum")):
                if key in spec.limits:
                    target.setdefault(keyword, spec.limits[key])


def _rewrite_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                name = value[len("#/$defs/"):]
                out[key] = f"#/$defs/{renames.get(name, name)}"
            else:
                out[key] = _rewrite_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, renames) for item in node]
    return node
