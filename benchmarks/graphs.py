"""`python -m benchmarks.graphs --device cuda`: the CUDA-graph engine against the eager one and against
transformers' own fast path, side by side in one process; one JSON file.

Single stream (bf16, decode tokens/s, the first customer turn of unseen conversations, persona system
prompts, every engine and baseline per conversation in a rotating order): transformers `generate`,
transformers with a static cache compiled with CUDA graphs, SpecDesk eager (`enforce_eager=True`) and
graphed, each plain and with the default speculation. Then the absolute step time of graphed plain decoding
beside the weight-read limit, 16 concurrent conversations (graphed plain vs graphed speculation, and eager
plain), and float32 greedy outputs of eager plain, graphed plain and graphed speculation compared.

    python -m benchmarks.graphs --device cuda --out graphs.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench import _eval_conversations, _first_user_turns
from benchmarks.common import Row, aggregate_rate, print_table
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams

# name -> LLM keyword arguments (on top of model, dtype, device)
ENGINES: dict[str, dict[str, Any]] = {
    "eager plain": {"enforce_eager": True, "speculator": None},
    "graphed plain": {"speculator": None},
    "eager speculation": {"enforce_eager": True},
    "graphed speculation": {},
}


def _engine(path: str, dtype: str, device: str, **kw: Any) -> LLM:
    return LLM(model=path, dtype=dtype, device=device, kv_cache_memory_gib=1.0, **kw)


def _rate(outs: list[Any]) -> float:
    return aggregate_rate(
        [o.metrics.decode_tokens_per_s for o in outs], [o.metrics.num_generated_tokens - 1 for o in outs]
    )


def single_stream(engines: dict[str, LLM], hf: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Per engine: decode tokens/s over the prompts, ms per decode step, tokens per step; transformers too."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for llm in engines.values():  # warm-up outside the timed prompts (Triton compiles on first use)
        llm.generate(prompts[-1:], params)
        llm.forget_replies()
    hf.generate(prompts[-1], 4)
    hf_static_ok = True
    try:
        hf.static_compiled_decode_tokens_per_s(prompts[-1], 16)  # compiles once
    except Exception as exc:  # report, keep measuring the rest
        print(f"transformers static cache + compile unavailable: {type(exc).__name__}: {exc}")
        hf_static_ok = False
    runners = [*engines, "transformers", *(["transformers static"] if hf_static_ok else [])]
    outs: dict[str, list[Any]] = {name: [] for name in engines}
    rates: dict[str, list[float]] = {"transformers": [], "transformers static": []}
    for i, ids in enumerate(prompts[:-1]):
        shift = i % len(runners)
        for name in runners[shift:] + runners[:shift]:
            if name == "transformers":
                rates[name].append(hf.decode_tokens_per_s(ids, max_tokens))
            elif name == "transformers static":
                rates[name].append(hf.static_compiled_decode_tokens_per_s(ids, max_tokens))
            else:
                outs[name].append(engines[name].generate([ids], params)[0])
    result: dict[str, Any] = {name: aggregate_rate(r) for name, r in rates.items() if r}
    for name, o in outs.items():
        steps = sum(x.metrics.num_decode_steps for x in o)
        decode_s = sum(x.metrics.decode_s for x in o)
        result[name] = _rate(o)
        result[f"{name} ms/step"] = 1e3 * decode_s / max(steps, 1)
        result[f"{name} tokens/step"] = sum(x.metrics.num_generated_tokens - 1 for x in o) / max(steps, 1)
    return result


def concurrent(engines: dict[str, LLM], prompts: list[list[int]], max_tokens: int, rounds: int = 2) -> dict[str, float]:
    """Aggregate generated tokens/s of len(prompts) conversations at once, engines alternating per round."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    totals: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name in list(engines)[:: 1 if r % 2 == 0 else -1]:
            engines[name].forget_replies()
            start = time.perf_counter()
            outs = engines[name].generate(prompts, params)
            totals[name].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    return {name: sum(v) / len(v) for name, v in totals.items()}


def exactness(path: str, device: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """float32 greedy: % of prompts whose output equals eager plain decoding's, per engine."""
    params = SamplingParams(max_tokens=max_tokens)
    outputs: dict[str, list[list[int]]] = {}
    for name in ("eager plain", "graphed plain", "graphed speculation", "eager speculation"):
        llm = _engine(path, "float32", device, spec_max_batch_size=len(prompts), **ENGINES[name])
        try:
            outputs[name] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    ref = outputs["eager plain"]
    return {name: 100 * sum(a == b for a, b in zip(out, ref, strict=True)) / len(ref) for name, out in outputs.items()}


def weight_read_ms(llm: LLM) -> tuple[float, float]:
    """(ms to read every weight once at the card's measured copy bandwidth, that bandwidth in GB/s)."""
    weights = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
    a = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    read_bw = a.numel() * 10 / (start.elapsed_time(end) / 1e3)  # bytes read per second (as many written)
    return 1e3 * weights / read_bw, read_bw / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path or hub id (default: built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="single-stream conversations")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--conversations", default=None, help="JSON list of conversations (default: prompts/eval)")
    ap.add_argument("--out", default="bench_graphs.json")
    args = ap.parse_args(argv)

    from benchmarks.baselines import TransformersBaseline
    from specdesk.engine.models.default_model import default_model_path

    path = args.model or str(default_model_path())
    convs = _eval_conversations(args.conversations)
    result: dict[str, Any] = {"args": vars(args), "errors": {}}
    engines: dict[str, LLM] = {}
    for name, kw in ENGINES.items():
        try:
            start = time.perf_counter()
            engines[name] = _engine(path, "bfloat16", args.device, **kw)
            result[f"start s, {name}"] = time.perf_counter() - start  # graph capture included
        except Exception as exc:  # a failed capture is a result too: measure the rest
            result["errors"][name] = traceback.format_exc(limit=3)
            print(f"{name} failed to start: {type(exc).__name__}: {exc}")
    any_llm = next(iter(engines.values()))
    count = max(args.prompts + 1, args.concurrency)
    prompts = [any_llm.encode(m) for m in _first_user_turns(convs, count)]
    hf = TransformersBaseline(path, torch.bfloat16, args.device)
    rows: list[Row] = []
    try:
        single = single_stream(engines, hf, prompts[: args.prompts + 1], args.max_tokens)
        result["single_stream"] = single
        hf_rate, static = single.get("transformers"), single.get("transformers static")
        for name in engines:
            rows.append(Row(f"single stream, SpecDesk {name}", single[name], hf_rate, "transformers generate", "tok/s"))
            if static:
                rows.append(Row(f"single stream, SpecDesk {name}", single[name], static,
                                "transformers static cache + compile", "tok/s"))  # fmt: skip
            rows.append(Row(f"  ms per decode step, {name}", single[f"{name} ms/step"], None, "", "ms"))
            rows.append(Row(f"  tokens per step, {name}", single[f"{name} tokens/step"], None, "", "tok/step"))
        pairs = [
            ("graphed plain", "eager plain", ">= 10x"), ("graphed speculation", "graphed plain", ">= 2x"),
            ("eager speculation", "eager plain", ""), ("graphed speculation", "eager speculation", ""),
        ]  # fmt: skip
        for ours, base, target in pairs:
            if ours in single and base in single:
                rows.append(Row(f"single stream, {ours}", single[ours], single[base], base, "tok/s", target))
        if args.device == "cuda" and "graphed plain" in engines:
            limit_ms, bw = weight_read_ms(engines["graphed plain"])
            result["weight_read_ms"], result["read_bandwidth_gb_s"] = limit_ms, bw
            step = single["graphed plain ms/step"]
            rows.append(Row("graphed plain step vs the weight-read limit", step, limit_ms, "weights / bandwidth", "ms"))
        load = concurrent({n: e for n, e in engines.items() if n != "eager speculation"},
                          prompts[: args.concurrency], args.max_tokens)  # fmt: skip
        result["concurrent"] = load
        if "graphed speculation" in load and "graphed plain" in load:
            rows.append(Row(f"{args.concurrency} concurrent, graphed speculation", load["graphed speculation"],
                            load["graphed plain"], "graphed plain", "tok/s", ">= 1.3x"))  # fmt: skip
        if "graphed plain" in load and "eager plain" in load:
            rows.append(Row(f"{args.concurrency} concurrent, graphed plain", load["graphed plain"],
                            load["eager plain"], "eager plain", "tok/s"))  # fmt: skip
    finally:
        for llm in engines.values():
            llm.shutdown()
    same = exactness(path, args.device, prompts[:4], args.max_tokens)
    result["float32_identical_pct"] = same
    for name, pct in same.items():
        rows.append(Row(f"float32 greedy identical to eager plain, {name}", pct, None, "", "%", "100 %"))
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result["table"] = print_table(
        rows, f"benchmarks.graphs: {Path(path).name}, bf16, {where}, torch {torch.__version__}"
    )
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
