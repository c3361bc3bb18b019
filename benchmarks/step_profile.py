"""`python -m benchmarks.step_profile`: where an engine step's time goes, per phase, plain vs speculative.

The engine steps synchronously in this thread (no serving loop) over a few unseen conversations, with
every phase of a step timed: proposing drafts, scheduling, preparing the batch, the model's layers, the
logits, sampling or verifying the tree, and the bookkeeping after. On CUDA each timed phase ends with a
device synchronisation (`--sync`, default there), so device work is charged to the phase that queued it
rather than to whichever later call happens to wait for it; the total then runs a little slower than
unprofiled.

    python -m benchmarks.step_profile                                # CPU, default model, plain vs default
    python -m benchmarks.step_profile --device cuda --tree-width 64  # the GPU's node tree
    python -m benchmarks.step_profile --threads 2 --quantization int8 --tree-width 4  # the CPU's int8 path
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from specdesk.engine import llm_engine
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams

Timings = collections.defaultdict[str, float]


def _wrap(obj: Any, name: str, key: str, acc: Timings, sync: Callable[[], None]) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        sync()
        acc[key] += time.perf_counter() - start
        return result

    setattr(obj, name, timed)


def profile(
    llm: LLM,
    prompts: list[list[int]],
    max_tokens: int,
    sync: Callable[[], None],
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    decode_only: bool = False,
) -> dict[str, float]:
    """ms per step of each phase (nested phases are included in their parents), tokens per step and the steps
    counted. decode_only: each request's prefill steps (through the one that emits its first token), which
    dominate the means on long prompts, left out of every figure."""
    engine = llm.engine
    acc: Timings = collections.defaultdict(float)
    phases: list[tuple[Any, str, str]] = [
        (engine.scheduler, "schedule", "schedule"),
        (engine.runner, "execute", "execute (pass + logits)"),
        (engine.runner, "prepare", "  prepare batch"),
        (engine.loaded.model, "forward", "  model layers"),
        (engine.loaded.model, "compute_logits", "  logits"),
        (llm_engine, "verify_step", "verify tree"),  # every row of the step: plain rows and trees
        (engine, "_text_delta", "detokenize + deltas"),
        (engine.scheduler, "append_tokens", "append tokens"),
    ]
    if engine.speculation is not None:
        spec = engine.speculation
        phases += [(spec, "propose", "propose drafts"), (spec, "accept", "accept (KV moves, stats, hidden)"),
                   (spec.width, "record", "  tree-width record")]  # fmt: skip
    verify_step = llm_engine.verify_step  # a module function: unwrapped again below, for the next engine
    for obj, name, key in phases:
        _wrap(obj, name, key, acc, sync)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, repetition_penalty=repetition_penalty,
                            temperature=temperature, top_p=top_p)  # fmt: skip

    skipped = [0.0]  # seconds of the prefill steps left out (decode_only)

    def run(ids: list[int]) -> tuple[int, int]:
        # Nothing carried over from an earlier run of the same prompt (the warm-up's): no cached prompt pages,
        # and no finished reply for the n-gram speculator to copy, which would inflate its acceptance.
        engine.block_manager.reset_prefix_cache()
        engine.forget_replies()
        engine.add_request(ids, params)
        steps = tokens = 0
        prefilled = not decode_only
        while engine.has_work:
            before, started = dict(acc), time.perf_counter()
            deltas = engine.step()
            emitted = sum(len(d.token_ids) for d in deltas)
            if not prefilled:  # a prefill step (the last one emits the first token): out of every figure
                acc.clear()
                acc.update(before)
                skipped[0] += time.perf_counter() - started
                prefilled = emitted > 0
                continue
            steps += 1
            tokens += emitted
        return steps, tokens

    run(prompts[0])  # warm-up (a GPU compiles its kernels here)
    acc.clear()
    skipped[0] = 0.0
    steps = tokens = 0
    start = time.perf_counter()
    for ids in prompts:
        s, t = run(ids)
        steps, tokens = steps + s, tokens + t
    wall = time.perf_counter() - start - skipped[0]
    llm_engine.verify_step = verify_step
    out = {"step (total)": 1e3 * wall / steps, "tokens per step": tokens / steps, "steps": float(steps)}
    out.update({k: 1e3 * v / steps for k, v in acc.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantization", default=None, choices=["int8", "q4_1", "int4", "auto"],
                    help="EngineConfig.quantization")  # fmt: skip
    ap.add_argument("--speculator", default="default", help="the speculative engine's EngineConfig.speculator")
    ap.add_argument("--tree-width", type=int, default=None, help="fixed node-tree width (default: measured)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1.1: the console's default")
    ap.add_argument("--temperature", type=float, default=0.0, help="0.7: the console's default (unseeded)")
    ap.add_argument("--top-p", type=float, default=1.0, help="0.9: the console's default")
    ap.add_argument("--sync", action=argparse.BooleanOptionalAction, default=None,
                    help="synchronise the device after every phase (default: on for CUDA)")  # fmt: skip
    ap.add_argument("--conversations", default=None, help="JSON list of conversations (default: prompts/eval)")
    ap.add_argument("--second-turns", action="store_true",
                    help="benchmarks.cpu's console turns (persona prompt, an earlier turn; ~680 tokens) instead of "
                         "first customer messages; implies --decode-only")  # fmt: skip
    ap.add_argument("--decode-only", action="store_true", help="leave each request's prefill steps out")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.bench import _eval_conversations, _first_user_turns

    use_sync = args.device == "cuda" if args.sync is None else args.sync
    sync = torch.cuda.synchronize if use_sync and args.device == "cuda" else (lambda: None)
    # Conversations 2 to n + 1, read once for both engines.
    messages = _first_user_turns(_eval_conversations(args.conversations), args.prompts + 1)[1:]
    results: dict[str, dict[str, float]] = {}
    for name, speculator in (("plain", None), (f"speculative ({args.speculator})", args.speculator)):
        llm = LLM(model=args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
                  quantization=args.quantization, speculator=speculator,
                  spec_tree_width=args.tree_width if speculator else None)  # fmt: skip
        llm.shutdown(keep_engine=True)  # its serving thread: this process steps the engine itself
        try:
            if args.second_turns:
                from benchmarks.cpu import second_turns

                prompts = [llm.apply_chat_template(m) for m in second_turns(args.prompts)]
            else:
                prompts = [llm.encode(m) for m in messages]
            results[name] = profile(llm, prompts, args.max_tokens, sync, args.repetition_penalty, args.temperature,
                                    args.top_p, decode_only=args.decode_only or args.second_turns)  # fmt: skip
        finally:
            llm.engine.close()
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"benchmarks.step_profile: {args.device}, {args.dtype}, ms per engine step (sync: {use_sync})\n")
    print("| phase | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for key in keys:
        digits = 0 if key == "steps" else 2  # a count, not ms
        print(f"| {key} | " + " | ".join(f"{r.get(key, 0.0):.{digits}f}" for r in results.values()) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
