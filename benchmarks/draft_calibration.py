"""`python -m benchmarks.draft_calibration`: would the penalty on drafts pay if their logits were on the base's scale?

Under the console's repetition penalty the base model's greedy token is the argmax of penalized logits (z / r for
a seen token with z > 0, z * r below 0). That rule is not shift-invariant, and a distilled head matches the base
model's logits only up to a constant per row, so applying it to the head's own logits (`draft_penalty`) is not
the base model's rule. This measures the shipped speculator's first head against the penalized greedy token over
held-out first turns (persona prompt, transformers float32, greedy with the penalty, `--max-tokens` tokens):

* top-1 as it is;
* penalized after adding the oracle constant (the mean over the draft vocabulary of the base's logits minus the
  head's at the same position, which no engine knows before verifying);
* penalized after adding the previous position's constant (what an engine knows after a verification).

    python -m benchmarks.draft_calibration --out docs/bench_draft_calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench import _eval_conversations, _first_user_turns
from specdesk.engine.config import DEFAULT_SPECULATOR_DIR
from specdesk.engine.logits_processors import penalize  # the engine's own rule, transformers'
from specdesk.engine.models.default_model import default_model_path
from specdesk.engine.speculators import draft_vocab


@torch.no_grad()
def measure(
    prompts: int, max_tokens: int, penalty: float, model_path: str | Path | None = None,
    speculator: str | Path = DEFAULT_SPECULATOR_DIR,
) -> dict[str, float | int]:  # fmt: skip
    """Head 0's top-1 hits in percent over every drafted position (model_path: the default model's when None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if model_path is None else model_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = draft_vocab.load_speculator(speculator, model, torch.float32, torch.device("cpu"))
    vocab = spec.draft_vocab if spec.draft_vocab is not None else torch.arange(model.config.vocab_size)
    hits = {"as_is": 0, "oracle_constant": 0, "previous_constant": 0}
    positions = 0
    for messages in _first_user_turns(_eval_conversations(None), prompts + 1)[1:]:
        ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)  # fmt: skip
        prompt = torch.as_tensor(ids["input_ids"])
        seq = model.generate(prompt, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             repetition_penalty=penalty)[0]  # fmt: skip
        out = model(seq[None], output_hidden_states=True)
        hidden, logits = out.hidden_states[-1][0], out.logits[0]
        previous = None
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
        seen[seq[: prompt.shape[1]]] = True
        for p in range(prompt.shape[1] - 1, len(seq) - 2):
            # Head 0 reads the state after token p and token p + 1 and drafts token p + 2, whose base logits are
            # logits[p + 1], penalized over the tokens up to p + 1.
            seen[seq[p + 1]] = True
            head = spec.logits(0, spec.step(0, spec.scale(hidden[p][None]), seq[p + 1][None]))[0].float()
            base, target, marked = logits[p + 1][vocab], int(seq[p + 2]), seen[vocab]
            constant = (base - head).mean()
            if previous is not None:  # a reply's first draft has no previous position: all three skip it
                hits["as_is"] += int(vocab[head.argmax()]) == target
                hits["oracle_constant"] += int(vocab[penalize(head + constant, marked, penalty).argmax()]) == target
                hits["previous_constant"] += int(vocab[penalize(head + previous, marked, penalty).argmax()]) == target
                positions += 1
            previous = constant
    result: dict[str, float | int] = {"positions": positions, "repetition_penalty": penalty}
    result |= {f"{k}_top1_percent": 100 * v / positions for k, v in hits.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="held-out first turns (2 to n + 1, as step_profile's)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.prompts, args.max_tokens, args.repetition_penalty)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            command = "python -m benchmarks.draft_calibration " + " ".join(sys.argv[1:] if argv is None else argv)
            json.dump({"command": command, **result}, f, indent=2)


if __name__ == "__main__":
    main()
