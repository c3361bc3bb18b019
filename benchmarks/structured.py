"""JSON-schema extraction on unseen customer messages, side by side in one process (default model, greedy):

    python -m benchmarks.structured [--num-prompts 10] [--max-tokens 96] [--threads 2] [--out FILE]

The first customer message of each eval conversation (specdesk/prompts/eval, never the train split), one
at a time, asked to be extracted into {order_number, intent, urgency, needs_human, summary}. Rows:

    unconstrained                     the instruction alone (speculation on): how often the reply parses
    constrained, plain                the schema as a grammar, speculate=False: no drafts, no jump-forward
    constrained, speculation + jump   the schema, the engine's speculators (pruned by the grammar) and the
                                      tokens the grammar forces appended without a model step

Reported per row: valid JSON (parses and matches the schema's keys and enums), tokens per step (generated
tokens after the first / decode steps), decode tok/s over all requests, and the grammar's overhead in ms per
engine step: on the engine thread (masks not ready when sampling starts, pruning, advancing, jump-forward),
and the masks computed in a worker while the model ran (overlapped). The two constrained rows must give the
same tokens (jump-forward only appends a token that is the grammar's sole choice).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from specdesk.engine.llm import LLM
from specdesk.engine.outputs import RequestOutput
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.structured_output import StructuredOutput
from specdesk.prompts.loader import load_dataset

INTENTS = ["refund", "delivery", "account_access", "billing", "technical_issue", "cancellation", "complaint", "other"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_number": {"type": "string", "pattern": "^[A-Za-z0-9-]{0,24}$"},
        "intent": {"type": "string", "enum": INTENTS},
        "urgency": {"type": "string", "enum": ["low", "medium", "high"]},
        "needs_human": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["order_number", "intent", "urgency", "needs_human", "summary"],
    "additionalProperties": False,
}
INSTRUCTION = (
    "Extract from the customer's message a JSON object with exactly these keys: order_number (the order, "
    'account or reference number, or "" if none), intent (one of: ' + ", ".join(INTENTS) + "), urgency "
    "(low, medium or high), needs_human (true or false) and summary (one short sentence). Reply with the "
    "JSON object only."
)


def prompts(num: int) -> list[list[dict[str, str]]]:
    """System instruction + the first customer message of the first `num` eval conversations."""
    entries = load_dataset("eval")[:num]
    first = [next(m for m in e.messages if m["role"] == "user")["content"] for e in entries]
    return [[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}] for text in first]


def is_valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    props = SCHEMA["properties"]
    return (
        isinstance(value, dict) and set(value) == set(props) and value["intent"] in INTENTS
        and value["urgency"] in props["urgency"]["enum"] and isinstance(value["needs_human"], bool)
    )  # fmt: skip


def run_row(llm: LLM, chats: list[list[int]], params: SamplingParams) -> tuple[dict[str, Any], list[RequestOutput]]:
    engine = llm.engine
    steps0, busy0, forced0 = engine.num_steps, llm.stats().grammar_s, llm.stats().grammar_num_forced_tokens
    overlapped0 = engine.grammar_compiler.stats.overlapped_s
    outs: list[RequestOutput] = []
    for ids in chats:  # one stream: each request alone, as an agent's console sends them
        outs += llm.generate([ids], params)
    steps = engine.num_steps - steps0
    busy = llm.stats().grammar_s - busy0
    overlapped = engine.grammar_compiler.stats.overlapped_s - overlapped0
    decode_tokens = sum(max(0, len(o.token_ids) - 1) for o in outs)
    decode_s = sum(o.metrics.decode_s for o in outs if o.metrics is not None)
    decode_steps = sum(o.metrics.num_decode_steps for o in outs if o.metrics is not None)
    row = {
        "valid_json_pct": 100.0 * sum(is_valid(o.text) for o in outs) / len(outs),
        "tokens_per_step": decode_tokens / decode_steps if decode_steps else 0.0,
        "decode_tok_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "grammar_ms_per_step": 1e3 * busy / steps if steps else 0.0,
        "overlapped_ms_per_step": 1e3 * overlapped / steps if steps else 0.0,
        "forced_tokens": llm.stats().grammar_num_forced_tokens - forced0,
        "generated_tokens": sum(len(o.token_ids) for o in outs),
        "engine_steps": steps,
    }
    return row, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(dtype="float32", device="cpu", num_threads=args.threads)
    try:
        chats = [llm.apply_chat_template(messages) for messages in prompts(args.num_prompts)]
        schema = StructuredOutput("json_schema", json.dumps(SCHEMA))
        llm.generate([chats[0]], SamplingParams(max_tokens=8, structured_output=schema))  # warm-up, compiles
        rows: dict[str, dict[str, Any]] = {}
        outputs: dict[str, list[RequestOutput]] = {}
        for name, params in (
            ("unconstrained", SamplingParams(max_tokens=args.max_tokens)),
            ("constrained, plain", SamplingParams(max_tokens=args.max_tokens, structured_output=schema,
                                                  speculate=False)),
            ("constrained, speculation + jump-forward", SamplingParams(max_tokens=args.max_tokens,
                                                                       structured_output=schema)),
        ):  # fmt: skip
            start = time.perf_counter()
            rows[name], outputs[name] = run_row(llm, chats, params)
            rows[name]["wall_s"] = time.perf_counter() - start
        same = [a.token_ids == b.token_ids for a, b in zip(*(outputs[n] for n in list(rows)[1:]), strict=True)]
        result = {"prompts": len(chats), "max_tokens": args.max_tokens, "threads": args.threads, "rows": rows,
                  "constrained_outputs_identical": f"{sum(same)}/{len(same)}",
                  "example": outputs["constrained, speculation + jump-forward"][0].text}  # fmt: skip
    finally:
        llm.shutdown()
    print("| row | valid JSON | tokens/step | decode tok/s | grammar ms/step | overlapped ms/step | forced tokens "
          "| wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['valid_json_pct']:.0f} % | {r['tokens_per_step']:.2f} | {r['decode_tok_per_s']:.1f} | "
              f"{r['grammar_ms_per_step']:.2f} | {r['overlapped_ms_per_step']:.2f} | {r['forced_tokens']} | "
              f"{r['wall_s']:.1f} |")  # fmt: skip
    identical = result["constrained_outputs_identical"]
    print(f"constrained outputs identical (plain vs speculation + jump-forward): {identical}")
    print(f"example: {result['example']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
