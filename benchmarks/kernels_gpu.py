"""`python -m benchmarks.kernels_gpu`: the Triton attention kernels on one CUDA GPU, in one ~3-minute run.

1. correctness of every kernel against its torch twin (NaN-poisoned outputs and unwritten cache slots);
2. times against the torch path (kernels/reference.py) and torch SDPA on contiguous K/V, for decode
   (batch 1-64, context 128-16k), verification, prefill and write_kv, with the bandwidth achieved
   (K/V bytes read / time) next to the card's device-to-device copy bandwidth (read + written / time);
3. end-to-end decode tokens/s of the default model through `engine.LLM`, torch vs triton backend,
   with and without speculation (skipped with the error recorded if the engine part fails).

    python -m benchmarks.kernels_gpu                   # markdown to stdout, JSON to $OUT or ./artifacts
    python -m benchmarks.kernels_gpu --quick --skip-e2e
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdesk.kernels import reference

LLAMA_8B = (32, 8, 128)  # (num_heads, num_kv_heads, head_dim) of the timing grid
DEVICE = "cuda"
Row = dict[str, Any]
TIMING_COLUMNS = "case triton_ms torch_ms sdpa_ms speedup_vs_torch triton_gbs triton_pct_copy triton_tflops skipped"
E2E_COLUMNS = "backend speculate num_prompts tokens wall_s tokens_per_s " + (
    "decode_tokens_per_s_per_seq tokens_per_step error"
)


def _bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    # Median of repeated runs; do_bench clears the L2 cache between them, so K/V come from HBM.
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def make_batch(
    seq_lens: list[int],
    query_lens: list[int],
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    page_size: int = 16,
    poison: bool = True,
    tree: bool = False,
) -> dict[str, Any]:
    """A random paged batch on CUDA with shuffled pages. poison=True leaves unwritten slots (and the
    table padding block 0) NaN, so a kernel that reads past a sequence returns NaN."""
    num_heads, num_kv_heads, head_dim = heads
    pages = [-(-s // page_size) for s in seq_lens]
    num_blocks = sum(pages) + 1
    block_ids = (torch.randperm(num_blocks - 1, device=DEVICE) + 1).int()
    block_tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=DEVICE)
    written = torch.zeros(num_blocks, page_size, dtype=torch.bool, device=DEVICE)
    start = 0
    for i, (seq_len, n) in enumerate(zip(seq_lens, pages, strict=True)):
        block_tables[i, :n] = block_ids[start : start + n]
        start += n
        if poison:
            pos = torch.arange(seq_len, device=DEVICE)
            written[block_tables[i, pos // page_size].long(), pos % page_size] = True
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
    if poison:
        k_cache[~written], v_cache[~written] = math.nan, math.nan
    num_tokens = sum(query_lens)
    tree_mask = None
    if tree:  # chains and random branches: every token sees itself plus a random subset of earlier ones
        width = max(query_lens)
        tree_mask = torch.rand(num_tokens, width, device=DEVICE) < 0.5
        local = torch.cat([torch.arange(q, device=DEVICE) for q in query_lens])
        cols = torch.arange(width, device=DEVICE)
        tree_mask = (tree_mask & (cols[None, :] < local[:, None])) | (cols[None, :] == local[:, None])
    return {
        "query": torch.randn(num_tokens, num_heads, head_dim, device=DEVICE, dtype=dtype),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "seq_lens": seq_lens,
        "query_lens": query_lens,
        "scale": head_dim**-0.5,
        "tree_mask": tree_mask,
    }


def _clean(batch: dict[str, Any]) -> dict[str, Any]:
    # The twin's batched decode multiplies masked V rows by 0, so it needs NaN-free caches.
    return {**batch, "k_cache": batch["k_cache"].nan_to_num(0.0), "v_cache": batch["v_cache"].nan_to_num(0.0)}


def check_correctness() -> list[Row]:
    """Each kernel vs its twin on ragged CUDA batches (auto split-K, tree masks, prefixes, GQA/MQA)."""
    from specdesk.kernels import triton_attention, triton_kv

    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    cases = [
        ("decode gqa4 auto-split", [1, 100, 1000, 5000], [1, 1, 1, 1], LLAMA_8B, torch.bfloat16, 16, False),
        ("decode smollm gqa3 d64", [1, 17, 333], [1, 1, 1], (9, 3, 64), torch.float16, 16, False),
        ("verify tree gqa8", [300, 2000], [5, 5], (64, 8, 128), torch.bfloat16, 16, True),
        ("verify causal page32", [33, 4097, 64], [4, 4, 1], LLAMA_8B, torch.float16, 32, False),
        ("prefill on prefix", [3000, 700], [1000, 700], LLAMA_8B, torch.float16, 16, False),
        ("mixed fp32", [1, 50, 600, 9, 5], [1, 13, 4, 9, 0], (8, 2, 64), torch.float32, 16, False),
        ("mqa d80 pad", [50, 129], [1, 3], (8, 1, 80), torch.float16, 32, False),
        ("long verify tree split", [16000], [6], LLAMA_8B, torch.bfloat16, 16, True),
    ]
    rows = []
    for name, seq_lens, query_lens, heads, dtype, page, tree in cases:
        batch = make_batch(seq_lens, query_lens, heads, dtype, page, poison=True, tree=tree)
        out = torch.full_like(batch["query"], math.nan)
        got = triton_attention.paged_attention(**batch, out=out)
        want = reference.paged_attention(**_clean(batch))
        err = (got.float() - want.float()).abs().max().item()
        ok = err <= tol[dtype] * (1 + want.float().abs().max().item())
        rows.append({"kernel": "paged_attention", "case": name, "dtype": str(dtype), "max_err": err, "ok": ok})
    for key_dtype, cache_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)):
        shape = (64, 16, 8, 128)
        k_cache = torch.full(shape, math.nan, device=DEVICE, dtype=cache_dtype)
        v_cache = torch.full_like(k_cache, math.nan)
        slots = torch.randperm(64 * 16, device=DEVICE)[:700]
        kv = torch.randn(700, 24, 128, device=DEVICE, dtype=key_dtype)  # fused QKV-like strided slices
        want_k, want_v = k_cache.clone(), v_cache.clone()
        reference.write_kv(kv[:, 8:16], kv[:, 16:], want_k, want_v, slots)
        triton_kv.write_kv(kv[:, 8:16], kv[:, 16:], k_cache, v_cache, slots)
        ok = torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0)) and torch.equal(
            v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0)
        )
        rows.append(
            {
                "kernel": "write_kv",
                "case": f"{key_dtype}->{cache_dtype}",
                "dtype": str(cache_dtype),
                "max_err": 0.0 if ok else math.inf,
                "ok": ok,
            }
        )
    return rows + _check_fused()


def _check_fused() -> list[Row]:
    # The fused layer ops on SmolLM2's shapes (576 hidden, 9 + 3 heads of 64, 1536 intermediate), bf16.
    from specdesk.kernels import triton_fused as tf

    x, res, w = (torch.randn(*s, device=DEVICE, dtype=torch.bfloat16) for s in ((65, 576), (65, 576), (576,)))
    qk, ang = torch.randn(65, 12, 64, device=DEVICE, dtype=torch.bfloat16), torch.randn(65, 1, 32, device=DEVICE)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    gate_up = torch.randn(65, 3072, device=DEVICE, dtype=torch.bfloat16)
    pairs = {"rms_norm + residual": (tf.rms_norm(x, w, 1e-5, res)[0], reference.rms_norm(x, w, 1e-5, res)[0]),
             "rotary": (tf.rotary(qk.clone(), cos, sin), reference.rotary(qk, cos, sin)),
             "silu_and_mul": (tf.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))}  # fmt: skip
    rows = []
    for name, (got, want) in pairs.items():
        err = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
        rows.append({"kernel": name, "case": "65 tokens", "dtype": "bf16", "max_err": err, "ok": err <= 1.6e-2})
    return rows


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: (bytes read + bytes written) / time, the card's practical peak."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * (1 << 31) / ms / 1e6


def _kv_bytes(batch: dict[str, Any]) -> int:
    # K and V rows each query block reads once: every sequence's context, all KV heads.
    _, _, num_kv_heads, head_dim = batch["k_cache"].shape
    return 2 * sum(batch["seq_lens"]) * num_kv_heads * head_dim * batch["k_cache"].element_size()


def _sdpa_contiguous(batch: dict[str, Any]) -> Callable[[], object]:
    # The same problem with dense [b, kvh, s, d] K/V and one length per batch: SDPA's best case.
    num_seqs, seq_len, q_len = len(batch["seq_lens"]), max(batch["seq_lens"]), max(batch["query_lens"])
    _, _, num_kv_heads, head_dim = batch["k_cache"].shape
    num_heads, dtype = batch["query"].shape[1], batch["query"].dtype
    q = torch.randn(num_seqs, num_heads, q_len, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(num_seqs, num_kv_heads, seq_len, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    gqa = num_heads != num_kv_heads
    if q_len == 1:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_len == seq_len:  # fresh prefill: SDPA's causal flash path
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # A causal suffix (SDPA's is_causal aligns top-left): query j sits at position seq_len - q_len + j.
    pos = torch.arange(seq_len, device=DEVICE)
    mask = pos[None, :] <= pos[seq_len - q_len :, None]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def time_attention(name: str, batch: dict[str, Any], copy_gbs: float, with_sdpa: bool = True) -> Row:
    """Triton vs torch path vs dense SDPA on one batch; bandwidth in GB/s and % of copy bandwidth."""
    from specdesk.kernels import triton_attention

    dev = batch["query"].device
    seq_lens_t = torch.tensor(batch["seq_lens"], dtype=torch.int32, device=dev)
    starts = torch.tensor([0, *batch["query_lens"]], device=dev).cumsum(0).to(torch.int32)
    out = torch.empty_like(batch["query"])
    row: Row = {
        "case": name,
        "num_seqs": len(batch["seq_lens"]),
        "context": max(batch["seq_lens"]),
        "query_len": max(batch["query_lens"]),
    }
    row["triton_ms"] = _bench_ms(
        lambda: triton_attention.paged_attention(**batch, seq_lens_t=seq_lens_t, query_start_loc=starts, out=out)
    )
    row["torch_ms"] = _bench_ms(lambda: reference.paged_attention(**batch))
    row["sdpa_ms"] = _bench_ms(_sdpa_contiguous(batch)) if with_sdpa else None
    row["triton_gbs"] = _kv_bytes(batch) / row["triton_ms"] / 1e6
    row["triton_pct_copy"] = 100 * row["triton_gbs"] / copy_gbs
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
    visible = sum(q * (s - q) + q * (q + 1) / 2 for s, q in zip(batch["seq_lens"], batch["query_lens"], strict=True))
    row["triton_tflops"] = 4 * batch["query"].shape[1] * batch["query"].shape[2] * visible / row["triton_ms"] / 1e9
    return row


def time_write_kv(num_tokens: int, copy_gbs: float) -> Row:
    from specdesk.kernels import triton_kv

    k_cache = torch.randn(4096, 16, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(4096 * 16, device=DEVICE)[:num_tokens]
    kv = torch.randn(num_tokens, 48, 128, device=DEVICE, dtype=torch.bfloat16)  # QKV of an 8B-like layer
    key, value = kv[:, 32:40], kv[:, 40:]
    triton_ms = _bench_ms(lambda: triton_kv.write_kv(key, value, k_cache, v_cache, slots))
    torch_ms = _bench_ms(lambda: reference.write_kv(key, value, k_cache, v_cache, slots))
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read once and written once
    return {
        "case": f"write_kv {num_tokens} tokens",
        "triton_ms": triton_ms,
        "torch_ms": torch_ms,
        "triton_gbs": moved / triton_ms / 1e6,
        "triton_pct_copy": 100 * moved / triton_ms / 1e6 / copy_gbs,
        "speedup_vs_torch": torch_ms / triton_ms,
    }


def timing_grid(quick: bool, copy_gbs: float, deadline: float) -> list[Row]:
    """Decode over batch x context, then verification, prefill and write_kv; stops at the deadline."""
    batches, contexts = ([1, 64], [1024, 16384]) if quick else ([1, 8, 32, 64], [128, 1024, 4096, 16384])
    plans: list[tuple[str, list[int], list[int], bool]] = []
    for b in batches:
        for ctx in contexts:
            plans.append((f"decode b{b} ctx{ctx}", [ctx] * b, [1] * b, False))
    for b in [1, 16] if quick else [1, 16, 64]:
        plans.append((f"verify q5 tree b{b} ctx4096", [4096] * b, [5] * b, True))
    plans.append(("ragged decode b64 ctx 128..16k", [128 * (1 + i * 2) for i in range(64)], [1] * 64, False))
    plans.append(("prefill 4096", [4096], [4096], False))
    plans.append(("prefill 1024 on 3072 prefix", [4096], [1024], False))
    plans.append(("prefill 8 x 512", [512] * 8, [512] * 8, False))
    rows = []
    for name, seq_lens, query_lens, tree in plans:
        if time.monotonic() > deadline:
            rows.append({"case": name, "skipped": "time budget"})
            continue
        batch = make_batch(seq_lens, query_lens, LLAMA_8B, torch.bfloat16, poison=False, tree=tree)
        ragged = len(set(seq_lens)) > 1
        rows.append(time_attention(name, batch, copy_gbs, with_sdpa=not tree and not ragged))
        del batch
        torch.cuda.empty_cache()
    for num_tokens in (64, 4096):
        rows.append(time_write_kv(num_tokens, copy_gbs))
    return rows


PROMPT = "You are a helpful customer-care assistant. Explain, step by step, how to reset a router"


def end_to_end(model: str | None, max_tokens: int, speculator: str | None) -> list[Row]:
    """Decode tokens/s through the public engine API, per backend and with/without speculation."""
    # Imported by name at run time: kernels/ must not depend on engine/ (nor type-check through it).
    engine: Any = importlib.import_module("engine")
    LLM, SamplingParams = engine.LLM, engine.SamplingParams

    rows: list[Row] = []
    for backend in ("torch", "triton"):
        try:
            extra = {"speculator": speculator} if speculator else {}
            llm = LLM(model=model, device=DEVICE, attention_backend=backend, **extra)
        except Exception as exc:
            rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            for num_prompts in (1, 16):  # compile/warm up at the timed shapes
                llm.generate([f"Warm-up {i}" for i in range(num_prompts)], SamplingParams(max_tokens=max_tokens))
            for speculate in (False, True):
                for num_prompts in (1, 16):
                    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, speculate=speculate)
                    prompts = [f"{PROMPT} (ticket {i})" for i in range(num_prompts)]
                    # Every run repeats the prompts of the one before: without this the n-gram speculator
                    # would look up the earlier run's identical replies.
                    llm.forget_replies()
                    start = time.perf_counter()
                    outs = llm.generate(prompts, params)
                    wall = time.perf_counter() - start
                    tokens = sum(len(o.token_ids) for o in outs)
                    rows.append(
                        {
                            "backend": backend,
                            "speculate": speculate,
                            "num_prompts": num_prompts,
                            "tokens": tokens,
                            "wall_s": wall,
                            "tokens_per_s": tokens / wall,
                            "decode_tokens_per_s_per_seq": sum(o.metrics.decode_tokens_per_s for o in outs) / len(outs),
                            "tokens_per_step": sum(o.metrics.tokens_per_step for o in outs) / len(outs),
                        }
                    )
        except Exception as exc:
            rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            llm.shutdown()
            del llm
            torch.cuda.empty_cache()
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(rows: list[Row], columns: list[str]) -> str:
    """A markdown table of the given columns (missing cells left blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller timing grid")
    parser.add_argument("--skip-e2e", action="store_true", help="kernels only")
    parser.add_argument("--model", default=None, help="engine model for the end-to-end part (default model)")
    parser.add_argument("--speculator", default=None, help="EngineConfig.speculator for the end-to-end part")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per end-to-end request")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop the timing grid after this")
    parser.add_argument("--out", default=os.environ.get("OUT") or "artifacts", help="folder for the JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels_gpu needs a CUDA GPU")
        return 2
    started = time.monotonic()
    import triton

    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    report["copy_gbs"] = copy_bandwidth_gbs()
    print(
        f"# benchmarks.kernels_gpu on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}\n\ndevice-to-device copy: {report['copy_gbs']:.0f} GB/s (read+write)\n"
    )

    report["correctness"] = check_correctness()
    print("## correctness vs torch twin\n")
    print(markdown(report["correctness"], ["kernel", "case", "dtype", "max_err", "ok"]) + "\n", flush=True)

    report["timings"] = timing_grid(args.quick, report["copy_gbs"], started + args.budget_s)
    print("## timings (bf16, 32 heads / 8 KV heads / head_dim 128, page 16; ms are medians)\n")
    print(markdown(report["timings"], TIMING_COLUMNS.split()) + "\n", flush=True)

    if not args.skip_e2e:
        try:
            report["e2e"] = end_to_end(args.model, args.max_tokens, args.speculator)
        except Exception as exc:  # the kernel numbers above must survive a broken engine
            report["e2e"] = [{"error": f"{type(exc).__name__}: {exc}"}]
        print("## end to end (engine.LLM, greedy, ignore_eos)\n")
        print(markdown(report["e2e"], E2E_COLUMNS.split()) + "\n")

    report["wall_s"] = time.monotonic() - started
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernels_bench.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path} after {report['wall_s']:.0f}s")
    return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
