"""JSON-schema rewriting for OpenAI's strict mode (tool arguments, `response_format` with `strict: true`)."""

from __future__ import annotations

from typing import Any


def close_objects(schema: Any) -> Any:
    """The schema with every object closed to undeclared properties where it does not say otherwise, at
    every depth (OpenAI's strict mode): a function has no use for them, and a small model otherwise fills
    calls with schema keywords."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(sub) for name, sub in out[key].items()}
    if out.get("type", "object" if "properties" in out else None) == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# Keywords whose value is a schema or a list of schemas (closed recursively).
_SUBSCHEMAS = frozenset({"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else"})
