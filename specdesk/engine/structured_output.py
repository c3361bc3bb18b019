"""What a request's output must match: a JSON schema, any JSON object, a regex, an EBNF grammar or a
structural tag (free text with constrained spans, e.g. tool calls). Plain data, validated at the boundary;
the engine compiles it into a grammar (engine/grammar/)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

StructuredKind = Literal["json_schema", "json_object", "regex", "ebnf", "structural_tag"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


@dataclass(frozen=True)
class StructuredOutput:
    """kind and its source text.

    json_schema     spec = the schema as JSON text (a dict is accepted and serialized in its own key order:
                    properties are generated in the order the schema declares them)
    json_object     spec = "" (any JSON object)
    regex           spec = the pattern
    ebnf            spec = the grammar (GBNF-style EBNF, `root` is the start rule)
    structural_tag  spec = the structural tag as JSON text (free text where triggers open constrained spans)
    """

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        spec: object = self.spec
        if isinstance(spec, dict) and self.kind in ("json_schema", "structural_tag"):
            object.__setattr__(self, "spec", json.dumps(spec))
        elif not isinstance(spec, str):
            raise ValueError(f"structured output spec must be a string, got {type(spec).__name__}")
        if self.kind in ("json_schema", "structural_tag"):
            try:
                json.loads(self.spec)
            except ValueError as exc:
                raise ValueError(f"structured output {self.kind} is not valid JSON: {exc}") from None
        elif self.kind in ("regex", "ebnf") and not self.spec:
            raise ValueError(f"structured output {self.kind} needs a non-empty spec")
