"""Compiling a request's StructuredOutput into a grammar state, with llguidance, cached per spec.

Why llguidance (measured in docs/benchmarks.md, `python -m benchmarks.grammar_libs`): its masks keep a forced
string to its canonical tokens, so a token it forces is the only one plain decoding could pick there and
jump-forward changes no output; it rolls back, compiles in well under a millisecond, and turns structural tags
into lazy lexemes (free text until a tool-call trigger).

Everything that can be wrong with a spec (invalid JSON schema, regex or grammar) surfaces here, in
`GrammarCompiler.compile`, as a ValueError: the engine calls it from `add_request`, never from its loop.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from specdesk.engine.grammar.state import GrammarState, GrammarStats, Vocabulary
from specdesk.engine.grammar.structural_tag import structural_tag_to_lark
from specdesk.engine.structured_output import StructuredOutput

if TYPE_CHECKING:
    import llguidance

# JSON without free whitespace: a small model otherwise wanders into endless newlines and spaces between
# tokens, which the grammar allows; a schema's own "x-guidance" options still win.
JSON_OPTIONS = {"whitespace_flexible": False}
# How many tokens a new grammar is walked at compile (`_probe`): the parser's limits bite at the first ones.
PROBE_TOKENS = 4


class GrammarCompiler:
    """Turns StructuredOutput specs into fresh per-request `GrammarState`s for one tokenizer.

    The llguidance tokenizer (a few tenths of a second to build) is made on first use. Compiled grammars are
    kept in an LRU cache keyed by the spec (equal schemas share one entry); each request gets its own copy
    of the cached, never-advanced matcher, which is cheap (the lexer is built lazily and shared).
    `compile` is thread-safe: a client may check a spec in its own thread before the engine thread adds it.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], cache_size: int = 64) -> None:
        assert cache_size > 0, cache_size
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._vocab: Vocabulary | None = None
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses: how many specs were compiled
        self.stats = GrammarStats()  # every state's costs, summed

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            import llguidance.hf

            if not self.eos_token_ids:
                raise ValueError("structured output needs a model with an end-of-sequence token")
            try:
                ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.eos_token_ids)
            except Exception as exc:  # e.g. a slow (pure-Python) tokenizer: a request error, not an engine one
                raise ValueError(f"structured output is not supported with this tokenizer: {exc}") from exc
            self._vocab = Vocabulary(ll_tokenizer, ll_tokenizer.vocab_size, frozenset(self.eos_token_ids))
        return self._vocab

    def compile(self, spec: StructuredOutput) -> GrammarState:
        """A new grammar state at the start of the output; ValueError if the spec is invalid."""
        if not isinstance(spec, StructuredOutput):
            raise ValueError(f"structured output must be a StructuredOutput, got {type(spec).__name__}")
        with self._lock:
            vocab = self.vocabulary  # built once, whoever asks first
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return GrammarState(template.deep_copy(), vocab, self.stats)
        # Compiled outside the lock: a big schema's seconds keep no other request waiting, a cached spec's least.
        # (Two requests bringing the same new spec may both compile it; the first one stored is kept.)
        compiled = self._compile(spec)
        with self._lock:
            template = self._cache.setdefault(spec, compiled)
            self._cache.move_to_end(spec)
            if template is compiled:
                self.num_compiled += 1
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return GrammarState(template.deep_copy(), vocab, self.stats)

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        import llguidance

        vocab = self.vocabulary
        grammar = self._grammar_text(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocab.tokenizer)
        if is_error:
            raise ValueError(f"structured output {spec.kind} is invalid: {_first_line(messages)}")
        matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured output {spec.kind} is invalid: {_first_line([matcher.get_error()])}")
        failure = _probe(matcher.deep_copy())
        if failure is not None:
            raise ValueError(f"structured output {spec.kind} is too large for the grammar parser: {failure}")
        return matcher

    def _grammar_text(self, spec: StructuredOutput) -> str:
        import llguidance

        matcher = llguidance.LLMatcher
        try:
            if spec.kind == "json_schema":
                schema = json.loads(spec.spec)
                if not isinstance(schema, dict | bool):
                    raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
                return matcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
            if spec.kind == "json_object":
                return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
            if spec.kind == "regex":
                return matcher.grammar_from_regex(spec.spec)
            if spec.kind == "ebnf":
                return llguidance.grammar_from("ebnf", spec.spec)
            lark = structural_tag_to_lark(json.loads(spec.spec), self._is_special_token, JSON_OPTIONS)
            return matcher.grammar_from_lark(lark)
        except ValueError as exc:
            raise ValueError(f"structured output {spec.kind} is invalid: {exc}") from None

    def _is_special_token(self, text: str) -> bool:
        """Whether `text` is exactly one special token of the tokenizer (then a trigger is that token)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        added = {t for t, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if tok.special}
        return len(ids) == 1 and ids[0] in special | added


def _first_line(messages: list[str]) -> str:
    """The messages on one line, at most 300 characters ("regex parse error:" alone says nothing: the reason
    is on the lines after it)."""
    text = " ".join(line.strip() for m in messages for line in m.splitlines() if line.strip()) or "unknown error"
    return text[:300]


def _probe(matcher: llguidance.LLMatcher, num_tokens: int = PROBE_TOKENS) -> str | None:
    """Walk a copy a few tokens along the first token each step allows; the parser's error, if it fails.

    A schema within the grammar size limit may still exceed the parser's per-step limits, e.g. an object of 2000
    constrained properties ("Current row has 8007 items; max is 2000") fails at its first token: here that is
    the request's own bad spec, refused up front, rather than an engine error once it runs."""
    for _ in range(num_tokens):
        if matcher.is_stopped():
            return None
        allowed = np.flatnonzero(np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little"))
        if not allowed.size or not matcher.consume_token(int(allowed[0])):
            break
    return _first_line([matcher.get_error()]) if matcher.is_error() else None
