"""xgrammar vs llguidance on this machine, with the default model's tokenizer: what chose the grammar library.

    python -m benchmarks.grammar_libs [--repeats 20]

Per library: tokenizer setup, compile time of the extraction schema (caches off), of any JSON object and of
a tool-call structural tag; the per-token mask time along a reference answer; whether rollback restores
the mask; and jump-forward: how many of the answer's tokens each library forces, and whether every forced
token is the only one its own mask allows there (else appending it changes the output of plain decoding).
xgrammar is not a SpecDesk dependency: `pip install xgrammar` first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

INTENTS = ["refund", "shipping_status", "cancel_order", "technical_issue", "billing", "other"]
SCHEMA = {
    "type": "object",
    "properties": {
        "order_number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{5}$"},
        "intent": {"type": "string", "enum": INTENTS},
        "urgency": {"type": "string", "enum": ["low", "medium", "high"]},
    },
    "required": ["order_number", "intent", "urgency"],
    "additionalProperties": False,
}
ANSWER = '{"order_number": "AB-12345", "intent": "refund", "urgency": "high"}'
TOOL_SCHEMA = {"type": "object", "properties": {"order_number": {"type": "string"}}, "required": ["order_number"]}


def _ms(f: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _bits(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab_size].bool()


def llguidance_numbers(tokenizer: Any, ids: list[int], repeats: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(tokenizer)
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - t, 3)}

    def compile_(grammar: str) -> Any:
        return llguidance.LLMatcher(tok, grammar)

    schema = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    out["compile_schema_ms"] = _ms(lambda: compile_(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))),
                                   repeats)  # fmt: skip
    out["compile_json_object_ms"] = _ms(lambda: compile_(llguidance.LLMatcher.grammar_from_json_schema("{}")), repeats)
    tag = llguidance.StructTag(trigger="<tool_call>", begin="<tool_call>", grammar=TOOL_SCHEMA, end="</tool_call>")
    out["compile_structural_tag_ms"] = _ms(lambda: compile_(llguidance.StructTag.to_grammar([tag])), repeats)
    m = compile_(schema)
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    per_token, forced, sole = [], 0, 0
    for token in ids:
        per_token.append(_ms(lambda: lt.fill_next_token_bitmask(m, mask), 1))  # once: a state's first mask
        ff = m.compute_ff_tokens()
        if ff:
            forced += 1
            sole += int(_bits(mask[0], tok.vocab_size).sum()) == 1 and ff[0] == token
        assert m.consume_token(token), m.get_error()
    lt.fill_next_token_bitmask(m, mask)
    end = mask.clone()
    m.rollback(len(ids))
    lt.fill_next_token_bitmask(m, mask)
    first = mask.clone()
    m.consume_tokens(ids)
    lt.fill_next_token_bitmask(m, mask)
    out["mask_ms_median"] = statistics.median(per_token)
    out["mask_ms_max"] = max(per_token)
    out["rollback_restores_mask"] = bool(torch.equal(mask, end)) and int(_bits(first[0], tok.vocab_size).sum()) == 2
    out["positions_with_forced_tokens"] = forced
    out["forced_token_is_sole_allowed"] = f"{sole}/{forced}"
    return out


def xgrammar_numbers(tokenizer: Any, ids: list[int], repeats: int) -> dict[str, Any]:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - t, 3)}
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    out["compile_schema_ms"] = _ms(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)), repeats)
    out["compile_json_object_ms"] = _ms(lambda: compiler.compile_builtin_json_grammar(), repeats)
    tag = xgr.StructuralTagItem(begin="<tool_call>", schema=json.dumps(TOOL_SCHEMA), end="</tool_call>")
    out["compile_structural_tag_ms"] = _ms(lambda: compiler.compile_structural_tag([tag], ["<tool_call>"]), repeats)
    m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    per_token, forced, sole = [], 0, 0
    for token in ids:
        per_token.append(_ms(lambda: m.fill_next_token_bitmask(mask), 1))
        if m.find_jump_forward_string():
            forced += 1
            sole += int(_bits(mask[0], info.vocab_size).sum()) == 1
        assert m.accept_token(token)
    m.fill_next_token_bitmask(mask)
    end = mask.clone()
    m.rollback(3)
    m.accept_token(ids[-3]), m.accept_token(ids[-2]), m.accept_token(ids[-1])
    m.fill_next_token_bitmask(mask)
    out["mask_ms_median"] = statistics.median(per_token)
    out["mask_ms_max"] = max(per_token)
    out["rollback_restores_mask"] = bool(torch.equal(mask, end))
    out["positions_with_forced_tokens"] = forced
    # A jump-forward string must be re-tokenized; where the mask allows several tokens the model's own
    # tokenization may differ, so appending it is not what plain decoding would have done.
    out["forced_token_is_sole_allowed"] = f"{sole}/{forced}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from specdesk.engine.models.default_model import default_model_path

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(ANSWER)
    result = {"answer_tokens": len(ids), "llguidance": llguidance_numbers(tokenizer, ids, args.repeats),
              "xgrammar": xgrammar_numbers(tokenizer, ids, args.repeats)}  # fmt: skip
    print(json.dumps(result, indent=1, default=lambda x: round(x, 4)))


if __name__ == "__main__":
    main()
