"""`python -m benchmarks.bench`: SpecDesk against its baselines, side by side in one process.

Every pair is measured in the same run with the same dtype and thread count; only ratios are claimed.
Conversations come from prompts/eval (never used to train the speculator).

    python -m benchmarks.bench                      # default model, bf16, 2 threads
    python -m benchmarks.bench --dtype float32 --max-tokens 64 --out bench.json
    python -m benchmarks.bench --device cuda        # the same suite on a GPU (transformers on the GPU too)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Row, aggregate_rate, print_table
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams


def _eval_conversations(path: str | None = None) -> list[list[dict[str, str]]]:
    """prompts/eval rendered, or a JSON file holding a list of conversations ([{role, content}, ...] each):
    the same benchmark on your own chats, or where langchain-core (the templates' renderer) is absent."""
    if path is not None:
        convs = json.loads(Path(path).read_text())
        if not (isinstance(convs, list) and convs and all(isinstance(c, list) and c for c in convs)):
            raise SystemExit(f"{path}: expected a JSON list of conversations, each a list of messages")
        return convs
    from specdesk.prompts.loader import load_conversations

    return load_conversations("eval")


def _first_user_turns(convs: list[list[dict[str, str]]], n: int) -> list[list[dict[str, str]]]:
    out = []
    for conv in convs:
        head = [m for m in conv if m["role"] == "system"]
        user = next(m for m in conv if m["role"] == "user")
        out.append([*head, user])
    return (out * (n // max(len(out), 1) + 1))[:n]


def single_stream(llm: LLM, hf: Any, prompts: list[list[int]], max_tokens: int) -> list[Row]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, speculate=False)
    ours, theirs = [], []
    for i, ids in enumerate(prompts):
        # Alternating which side goes first spreads this machine's drift over both.
        for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            if side == "ours":
                ours.append(llm.generate([ids], params)[0].metrics.decode_tokens_per_s)
            else:
                theirs.append(hf.decode_tokens_per_s(ids, max_tokens))
    mean, base = aggregate_rate(ours), aggregate_rate(theirs)  # equal token counts: ignore_eos
    return [Row("single-stream decode", mean, base, "transformers generate", "tok/s", ">= 1.5x")]


def turn5_ttft(llm: LLM, convs: list[list[dict[str, str]]], max_tokens: int) -> list[Row]:
    """Play turns 1-4 of long conversations through the engine, then time turn 5 warm and cold."""
    warm, cold = [], []
    params = SamplingParams(max_tokens=max_tokens)
    for conv in [c for c in convs if sum(m["role"] == "user" for m in c) >= 5][:3]:
        history: list[dict[str, str]] = [m for m in conv if m["role"] == "system"]
        users = [m for m in conv if m["role"] == "user"]
        for user in users[:4]:
            history.append(user)
            out = llm.generate([history], params)[0]
            history.append({"role": "assistant", "content": out.text})
        history.append(users[4])
        ids = llm.encode(history)
        warm.append(_ttft(llm, ids))
        cold.append(_ttft(llm, ids, cache_salt=f"cold-{time.perf_counter()}"))  # a fresh salt shares nothing
    if not warm:
        return []
    w, c = sum(warm) / len(warm), sum(cold) / len(cold)
    return [Row("turn-5 time to first token", w, c, "same engine, no prefix reuse", "s", ">= 5x lower")]


def _ttft(llm: LLM, ids: list[int], cache_salt: str | None = None) -> float:
    params = SamplingParams(max_tokens=1)
    start = time.perf_counter()
    for _ in llm.stream(ids, params, cache_salt=cache_salt):
        pass
    return time.perf_counter() - start


def concurrent(llm: LLM, hf: Any, prompts: list[list[int]], max_tokens: int) -> list[Row]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, speculate=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    ours = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    one_by_one = len(prompts) * max_tokens / sum(hf.generate(ids, max_tokens) for ids in prompts)
    rows = [Row(f"{len(prompts)} concurrent conversations", ours, one_by_one, "transformers one by one",
                "tok/s", ">= 6x")]  # fmt: skip
    batch = hf.generate_batch_tokens_per_s(prompts, max_tokens)
    if batch is not None:
        rows.append(Row(f"{len(prompts)} concurrent conversations", ours, batch,
                        "transformers generate_batch", "tok/s"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path or hub id (default: built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="both engines run here")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=6, help="single-stream prompts")
    ap.add_argument("--spec-prompts", type=int, default=12, help="single-stream prompts of the speculation suite")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--suite",
        default="all",
        choices=["core", "spec", "all", "load"],
        help="load: only the speculation on/off comparison at 8 and 16 concurrent conversations",
    )
    ap.add_argument("--variants", default=None, help="speculation suite: comma-separated subset of "
                    "plain, ngram, mlp-paths, mlp, mlp-64, default, unfused (CUDA) (default: all)")  # fmt: skip
    ap.add_argument("--skip-load", action="store_true", help="speculation suite without the 8/16-concurrent rows")
    ap.add_argument("--conversations", default=None, help="JSON list of conversations (default: prompts/eval)")
    ap.add_argument("--out", default="bench_engine.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.baselines import TransformersBaseline
    from specdesk.engine.models.default_model import default_model_path

    path = args.model or str(default_model_path())
    llm = LLM(model=path, dtype=args.dtype, device=args.device, num_threads=args.threads, speculator=None)
    hf = TransformersBaseline(path, getattr(torch, args.dtype), args.device)
    convs = _eval_conversations(args.conversations)
    count = max(args.concurrency, args.spec_prompts, args.num_prompts)
    prompts = [llm.encode(m) for m in _first_user_turns(convs, count)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8))  # warm-up both engines
    hf.generate(prompts[0], 8)

    rows: list[Row] = []
    if args.suite in ("core", "all"):
        rows += single_stream(llm, hf, prompts[: args.num_prompts], args.max_tokens)
        rows += turn5_ttft(llm, convs, max_tokens=48)
        rows += concurrent(llm, hf, prompts[: args.concurrency], args.max_tokens)
    llm.shutdown()
    from benchmarks import spec as bench_spec

    if args.suite == "load":
        rows += bench_spec.under_load(path, args.dtype, args.threads, prompts, args.max_tokens, device=args.device)
    if args.suite in ("spec", "all"):
        variants = bench_spec.select(args.variants, args.device)
        rows += bench_spec.run(path, args.dtype, args.threads, prompts, args.max_tokens, hf, args.spec_prompts,
                               device=args.device, variants=variants, with_load=not args.skip_load)  # fmt: skip
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    header = (f"benchmarks.bench: {Path(path).name}, {args.dtype}, {where}, "
              f"{args.max_tokens} new tokens, torch {torch.__version__}")  # fmt: skip
    table = print_table(rows, header)
    result = {"args": vars(args), "table": table,
              "rows": [{**r.__dict__, "ratio": r.ratio} for r in rows]}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
