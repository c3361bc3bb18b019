"""`python -m benchmarks.cpu`: the CPU paths side by side with llama.cpp and transformers, end to end per turn.

One process per thread count (1 and the machine's default, 2 here), every system on the same prompts: the
second customer turn of held-out conversations (prompts/eval) under the console's persona system prompt,
rendered with the chat template. A turn is timed from submit to the last of exactly `--max-tokens` tokens
(EOS ignored), prefill included, with nothing cached: SpecDesk's prefix cache and the n-gram
speculator's memory of earlier replies are emptied before each run, llama.cpp's context is reset. Every
system uses the console's repetition penalty (1.1; llama.cpp's own penalty over its last 64 tokens), or
`--repetition-penalty` (1.0: the API's default, no penalty). Tokens are greedy unless `--temperature` is set:
`--temperature 0.7 --top-p 0.9` is the console's own sampling (every system samples alike; SpecDesk's requests
are seeded, so its speculative replies must still equal its plain ones, and the quality figures, which compare
greedy replies, are left out).

* transformers `generate` in the reference dtype: bf16 (the issue's baseline) where the CPU has native bf16
  matmuls, float32 where it does not (AVX2-only CPUs, where torch's bf16 runs several times slower than
  float32; what `dtype="auto"` picks there); `--reference-dtype` overrides
* llama.cpp (`llama-cpp-python`, `pip install -e ".[llama]"`) on the default model's own Q4_1 GGUF file
* SpecDesk unquantized in the reference dtype, plain and with the default speculator
* SpecDesk int8 (the C kernels with int8 weights, `quantization="int8"`), plain and with the default speculator
* SpecDesk as the console runs it (`dtype` and `quantization` "auto": on an AVX2 or AVX-512 VNNI CPU the C
  kernels with the GGUF file's own Q4_1 weights, W4A8), plain and with the default speculator

Also reported, for int8 and the console's path: speculation vs plain (identical tokens expected: the paths are
exact) and the quality loss against the reference dtype: the share of greedy tokens before the first difference
(a harsh measure: one near-tie flips the rest of a reply) and teacher-forced top-1 agreement (the path's choice
at each position of the reference's reply, given its tokens so far). Which kernel paths ran is recorded.
SpecDesk's plain and speculative runs alternate per prompt; the systems run one after another in the process
(the C kernels' engines set torch's own ops to one thread while they live, so they run last).

    python -m benchmarks.cpu --out docs/bench_cpu_llamacpp.json     # ~20 minutes on 2 cores
    python -m benchmarks.cpu --repetition-penalty 1.0               # the API's default sampling
    python -m benchmarks.cpu --temperature 0.7 --top-p 0.9          # the console's: sampled, penalty 1.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULT, worker_result
from specdesk import prompts

PENALTY = 1.1


@dataclass(frozen=True)
class Decoding:
    """How every system picks tokens: the repetition penalty, and greedy (temperature 0) or sampled."""

    penalty: float = PENALTY
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def second_turns(limit: int) -> list[list[dict[str, str]]]:
    """Held-out conversations up to their second customer turn, under their persona's system prompt."""
    personas = {p.key for p in prompts.list_personas()}
    out = []
    for entry in prompts.load_dataset("eval"):
        user_turns = [i for i, m in enumerate(entry.messages) if m["role"] == "user"]
        if len(user_turns) >= 2:
            persona = entry.domain if entry.domain in personas else "general"
            out.append(prompts.build_messages(persona, entry.messages[: user_turns[1] + 1]))
    return out[:limit]


def hidden_states(llm: Any, sequences: list[list[int]]) -> Iterator[Any]:
    """The model's last hidden state at every position of each sequence, one pass each, on a KV pool of its own
    (nothing the engine holds is touched); the caller takes what it needs through `llm.loaded.model`."""
    import torch

    from specdesk.engine.attention_metadata import AttentionMetadata
    from specdesk.engine.config import EngineConfig
    from specdesk.engine.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig(num_blocks=max(map(len, sequences)) // 16 + 2), llm.loaded)
    with torch.inference_mode(), contextlib.closing(runner):
        for ids in sequences:
            meta = AttentionMetadata.build([list(range(len(ids) // 16 + 1))], [len(ids)], [len(ids)], 16)
            yield runner.model(torch.tensor(ids), torch.arange(len(ids)), runner.kv_caches, meta)


def teacher_forced_top1(
    llm: Any, prompt_ids: list[list[int]], replies: list[list[int]], penalty: float = PENALTY
) -> float:
    """Percent of reply positions where this model's greedy choice, given the reference reply so far, is the
    reference's token (under the same repetition penalty): the per-token quality of a path, without greedy
    decoding's chain of divergences."""
    import torch

    from specdesk.engine.logits_processors import penalize

    same = total = 0
    sequences = [p + r for p, r in zip(prompt_ids, replies, strict=True)]
    with torch.inference_mode():
        for prompt, reply, ids, hidden in zip(prompt_ids, replies, sequences, hidden_states(llm, sequences),
                                              strict=True):  # fmt: skip
            rows = hidden[len(prompt) - 1 : len(ids) - 1]  # the rows that predict each reply token
            logits = llm.loaded.model.compute_logits(rows)
            for t in range(len(reply)):  # the replies' repetition penalty (transformers' rule), over the tokens so far
                seen = torch.zeros(logits.shape[1], dtype=torch.bool)
                seen[ids[: len(prompt) + t]] = True
                logits[t] = penalize(logits[t], seen, penalty)
            choice = logits.argmax(-1).tolist()
            same += sum(a == b for a, b in zip(choice, reply, strict=True))
            total += len(reply)
    return 100 * same / max(total, 1)


def _specdesk(
    quantization: str | None, dtype: str, prompt_ids: list[list[int]], n: int,
    reference: list[list[int]] | None = None, decoding: Decoding = Decoding(),
) -> dict[str, Any]:  # fmt: skip
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(dtype=dtype, quantization=quantization, spec_max_batch_size=32)
    resolved = llm.loaded.quantization
    params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=decoding.penalty,
                            temperature=decoding.temperature, top_p=decoding.top_p)  # fmt: skip
    seconds = {False: 0.0, True: 0.0}
    decode_seconds = {False: 0.0, True: 0.0}  # first token to last: the speculation's own ratio, prefill apart
    outputs: dict[bool, list[list[int]]] = {False: [], True: []}
    try:
        llm.generate(prompt_ids[:1], replace(params, max_tokens=8))  # warm-up (and the kernels' build)
        for i, ids in enumerate(prompt_ids):
            for speculate in (True, False) if i % 2 == 0 else (False, True):
                llm.reset_prefix_cache()
                llm.forget_replies()
                start = time.perf_counter()
                seed = None if decoding.greedy else 1000 + i  # the same draws for plain and speculative
                out = llm.generate([ids], replace(params, speculate=speculate, seed=seed))[0]
                seconds[speculate] += time.perf_counter() - start
                decode_seconds[speculate] += out.metrics.decode_s
                outputs[speculate].append(out.token_ids)
        forced = teacher_forced_top1(llm, prompt_ids, reference, decoding.penalty) if reference is not None else None
        stats = llm.stats()
        steps = stats.spec_num_drafts or 1
        return {
            "plain_tok_s": n * len(prompt_ids) / seconds[False],
            "spec_tok_s": n * len(prompt_ids) / seconds[True],
            "plain_decode_tok_s": (n - 1) * len(prompt_ids) / decode_seconds[False],
            "spec_decode_tok_s": (n - 1) * len(prompt_ids) / decode_seconds[True],
            "identical_with_speculation": sum(a == b for a, b in zip(outputs[False], outputs[True], strict=True)),
            "tokens_per_verification": (stats.spec_num_accepted_tokens + steps) / steps,
            "plain_tokens": outputs[False],
            "teacher_forced_top1_vs_reference_percent": forced,
            "quantization": resolved,
        }
    finally:
        llm.shutdown()


def _transformers(prompt_ids: list[list[int]], n: int, dtype: str, decoding: Decoding = Decoding()) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from specdesk.engine.models.default_model import default_model_path

    model: Any = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=getattr(torch, dtype)).eval()
    seconds = 0.0
    sampling = {} if decoding.greedy else {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
    with torch.inference_mode():
        for i, ids in enumerate(prompt_ids):
            x = torch.tensor([ids])
            torch.manual_seed(1000 + i)
            start = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=not decoding.greedy, repetition_penalty=decoding.penalty, pad_token_id=0,
                           **sampling)  # fmt: skip
            seconds += time.perf_counter() - start
    return n * len(prompt_ids) / seconds


def _llama_cpp(prompt_ids: list[list[int]], n: int, threads: int, decoding: Decoding = Decoding()) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed: skipping llama.cpp (pip install -e '.[llama]')", file=sys.stderr)
        return None
    from specdesk.engine.models.default_model import locate_gguf

    gguf = locate_gguf(Path(tempfile.mkdtemp()))
    model = Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, seed=1000
    )
    seconds = 0.0
    for ids in prompt_ids:
        model.reset()
        start = time.perf_counter()
        tokens = model.generate(
            ids,
            temp=decoding.temperature,
            top_p=decoding.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=decoding.penalty,
            reset=True,
        )  # top_k 0: off, as the others
        for count, _token in enumerate(tokens, 1):
            if count == n:
                break
        seconds += time.perf_counter() - start
    return n * len(prompt_ids) / seconds


def worker(threads: int, turns: int, n: int, dtype: str, decoding: Decoding = Decoding()) -> dict[str, Any]:
    """Every system at one thread count, in this process; `dtype` the reference's ("auto": resolve_dtype's)."""
    import torch

    torch.set_num_threads(threads)
    from specdesk.engine.llm import LLM
    from specdesk.engine.models.loader import resolve_dtype
    from specdesk.kernels import cpu_lib

    if dtype == "auto":
        dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    lib = cpu_lib.library()

    tokenizer_llm = LLM(speculator=None, num_blocks=4)
    prompt_ids = [tokenizer_llm.apply_chat_template(m) for m in second_turns(turns)]
    tokenizer_llm.shutdown()
    result: dict[str, Any] = {"threads": threads, "turns": len(prompt_ids), "max_tokens": n,
                              "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
                              "reference_dtype": dtype, "repetition_penalty": decoding.penalty,
                              "temperature": decoding.temperature, "top_p": decoding.top_p,
                              "int8_path": cpu_lib.int8_path(),
                              "attention_path": lib.sd_attention_path() if lib else None}  # fmt: skip
    result["transformers_tok_s"] = _transformers(prompt_ids, n, dtype, decoding)
    print(f"[{threads} threads] transformers {dtype}: {result['transformers_tok_s']:.1f} tok/s", flush=True)
    result["llama_cpp_tok_s"] = _llama_cpp(prompt_ids, n, threads, decoding)
    print(f"[{threads} threads] llama.cpp: {result['llama_cpp_tok_s']} tok/s", flush=True)
    systems = (("unquantized", None, dtype), ("int8", "int8", "bfloat16"), ("console", "auto", "auto"))
    for name, quantization, run_dtype in systems:
        reference = result["unquantized"]["plain_tokens"] if quantization and decoding.greedy else None
        result[name] = _specdesk(quantization, run_dtype, prompt_ids, n, reference, decoding)
        got = result[name]
        print(f"[{threads} threads] SpecDesk {name} ({got['quantization']}): plain {got['plain_tok_s']:.1f}, "
              f"speculative {got['spec_tok_s']:.1f} tok/s", flush=True)  # fmt: skip
    unquantized = result["unquantized"].pop("plain_tokens")
    for name in ("int8", "console"):  # sampled replies differ by the draws: only greedy ones are compared
        plain = result[name].pop("plain_tokens")
        result[f"{name}_vs_reference"] = agreement(unquantized, plain) if decoding.greedy else None
    return result


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """How close greedy replies are: the share of tokens before the first difference, and of replies identical."""
    prefix = total = same = 0
    for a, b in zip(reference, other, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix, total, same = prefix + k, total + len(a), same + (a == b)
    return {"tokens_before_first_difference_percent": 100 * prefix / max(total, 1),
            "identical_replies_percent": 100 * same / max(len(reference), 1)}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """The headline rows: tok/s end to end per turn, and the ratios the issue names."""
    dt = results[0]["reference_dtype"] if results else "?"
    lines = [f"| threads | transformers {dt} | llama.cpp Q4_1 | SpecDesk {dt} plain / spec "
             "| SpecDesk int8 plain / spec | SpecDesk console (quantization) plain / spec | console spec vs llama.cpp "
             "| console plain vs transformers | console spec vs own plain | the same, decode only |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        cpp, i8, b16, c = r["llama_cpp_tok_s"], r["int8"], r["unquantized"], r["console"]
        vs_cpp = f"{c['spec_tok_s'] / cpp:.2f}x" if cpp else "n/a"
        lines.append(
            f"| {r['threads']} | {r['transformers_tok_s']:.1f} | {f'{cpp:.1f}' if cpp else 'n/a'} | "
            f"{b16['plain_tok_s']:.1f} / {b16['spec_tok_s']:.1f} | {i8['plain_tok_s']:.1f} / {i8['spec_tok_s']:.1f} | "
            f"({c['quantization']}) {c['plain_tok_s']:.1f} / {c['spec_tok_s']:.1f} | {vs_cpp} | "
            f"{c['plain_tok_s'] / r['transformers_tok_s']:.2f}x | {c['spec_tok_s'] / c['plain_tok_s']:.2f}x | "
            f"{c['spec_decode_tok_s'] / c['plain_decode_tok_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and the machine's cores")
    ap.add_argument("--turns", type=int, default=8, help="held-out conversations (their second turn)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--reference-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="transformers' and unquantized SpecDesk's dtype (auto: bf16 where the CPU has it natively)",
    )
    ap.add_argument("--repetition-penalty", type=float, default=PENALTY,
                    help="every system's (default: the console's 1.1; 1.0: the API's default, no penalty)")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); the console's is 0.7")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature (the console's is 0.9)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one thread count, JSON to stdout
    args = ap.parse_args(argv)
    if args.worker is not None:
        decoding = Decoding(args.repetition_penalty, args.temperature, args.top_p)
        result = worker(args.worker, args.turns, args.max_tokens, args.reference_dtype, decoding)
        print(RESULT + json.dumps(result), flush=True)
        return
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    results = []
    for t in threads:  # one process each: thread settings and the int8 engine's stay out of the others' way
        argv = ["benchmarks.cpu", "--worker", str(t), "--turns", str(args.turns), "--max-tokens", str(args.max_tokens),
                "--repetition-penalty", str(args.repetition_penalty), "--temperature", str(args.temperature),
                "--top-p", str(args.top_p),
                "--reference-dtype", args.reference_dtype]  # fmt: skip
        results.append(worker_result(argv, f"the {t}-thread run"))
    sampled = f", temperature {args.temperature:g}, top-p {args.top_p:g}" if args.temperature else ", greedy"
    print(f"repetition penalty {args.repetition_penalty:g}{sampled}\n")
    print(table(results))
    for r in results:
        for name in ("int8", "console"):
            got, forced = r[name], r[name]["teacher_forced_top1_vs_reference_percent"]
            quality = (f"vs {r['reference_dtype']}: greedy {r[f'{name}_vs_reference']}, teacher-forced top-1 "
                       f"{forced:.1f} %; " if forced is not None else "")  # fmt: skip
            print(
                f"[{r['threads']} threads] {name} ({got['quantization']}, {r['int8_path']}) {quality}"
                f"speculation identical to plain on {got['identical_with_speculation']} of {r['turns']} turns"
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
