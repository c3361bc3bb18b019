"""Speculative-decoding benchmark (`python -m benchmarks.bench --suite spec`): every variant in one process.

Single stream: transformers `generate`, transformers prompt-lookup assisted generation, llama.cpp on the
same GGUF (when `llama-cpp-python` is installed), and SpecDesk plain / n-gram / MLP / MLP + n-gram, all
greedy on the first customer turn of unseen conversations (prompts/eval). Also: whether every variant's
output is token-for-token identical to plain decoding, mean tokens per base step, acceptance by head
position, and aggregate throughput at 8 and 16 concurrent conversations with and without speculation.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Row, aggregate_rate
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams

# name -> (speculator, tree kind, fixed tree width or None for the measured choice of speculators/tree_width.py)
Variant = tuple[str | None, str, int | None]
VARIANTS: dict[str, Variant] = {
    "plain": (None, "nodes", None),
    "n-gram": ("ngram", "nodes", None),
    "MLP, IBM's 5-path tree": ("default-mlp", "paths", 5),
    "MLP": ("default-mlp", "nodes", None),
    # The GPU regime (verified tokens nearly free): the 64 most likely draft nodes.
    "MLP, 64-node tree": ("default-mlp", "nodes", 64),
    "MLP + n-gram": ("default", "nodes", None),
}
# On CUDA only: plain decoding with the norms, rotary and SwiGLU as separate torch ops instead of the
# fused Triton kernels (kernels/triton_fused.py), to measure what the fusion saves.
UNFUSED = "plain, unfused ops"
# On CPU only: the layers' weights in 4 bits (EngineConfig.quantization="int4"); "int4" in a name sets it,
# and those variants are compared with the int4 plain one (their own numerics).
INT4_PLAIN, INT4_DEFAULT = "plain, int4 weights", "MLP + n-gram, int4 weights"
# --variants names (plain, the reference, always runs).
SHORT_NAMES = {"plain": "plain", "ngram": "n-gram", "mlp-paths": "MLP, IBM's 5-path tree", "mlp": "MLP",
               "mlp-64": "MLP, 64-node tree", "default": "MLP + n-gram", "unfused": UNFUSED,
               "int4": INT4_PLAIN, "default-int4": INT4_DEFAULT}  # fmt: skip


def select(names: str | None, device: str) -> dict[str, Variant]:
    """The variants to run: all (plus the unfused ones on CUDA, the int4 ones on CPU), or `names`
    (comma-separated SHORT_NAMES)."""
    if device == "cuda":
        every = {**VARIANTS, UNFUSED: VARIANTS["plain"]}
    else:
        every = {**VARIANTS, INT4_PLAIN: VARIANTS["plain"], INT4_DEFAULT: VARIANTS["MLP + n-gram"]}
    if not names:
        return every
    chosen = {"plain"}
    for short in filter(None, (n.strip() for n in names.split(","))):
        if short not in SHORT_NAMES:
            raise SystemExit(f"--variants: unknown {short!r}; choose from {', '.join(SHORT_NAMES)}")
        if SHORT_NAMES[short] not in every:
            raise SystemExit(f"--variants: {short!r} does not run on {device}")
        chosen.add(SHORT_NAMES[short])
    if any("int4" in name for name in chosen):
        chosen.add(INT4_PLAIN)  # their reference
    return {name: v for name, v in every.items() if name in chosen}


def _engine(
    path: str,
    dtype: str,
    threads: int,
    speculator: str | None,
    tree: str = "nodes",
    width: int | None = None,
    device: str = "cpu",
    unfused: bool = False,
    int4: bool = False,
    **kw: Any,
) -> LLM:
    from specdesk.engine.models.layers import set_fused_ops
    from specdesk.engine.speculators import DEFAULT_SPECULATOR_DIR

    spec = str(DEFAULT_SPECULATOR_DIR) if speculator == "default-mlp" else speculator
    llm = LLM(model=path, dtype=dtype, device=device, num_threads=threads, speculator=spec,
              kv_cache_memory_gib=0.5, spec_tree=tree, spec_tree_width=width,
              quantization="int4" if int4 else None, **kw)  # fmt: skip
    if unfused:
        set_fused_ops(llm.loaded.model, "torch")
    return llm


def run(
    path: str,
    dtype: str,
    threads: int,
    prompts: list[list[int]],
    max_tokens: int,
    hf: Any,
    num_single: int = 12,
    device: str = "cpu",
    variants: dict[str, Variant] | None = None,
    with_load: bool = True,
) -> list[Row]:
    """Every row of the suite. Acceptance varies a lot from conversation to conversation (1.3 to 3.5 tokens
    per step), so the single-stream rows average `num_single` of them; the slow side rows (transformers
    prompt lookup, float32 exactness) use the first four."""
    params = SamplingParams(max_tokens=max_tokens)
    rows: list[Row] = []
    single, few = prompts[:num_single], prompts[:4]
    lookup = sum(hf.prompt_lookup_tokens_per_s(ids, max_tokens) for ids in few) / len(few)
    e2e = sum(max_tokens / hf.generate(ids, max_tokens) for ids in few) / len(few)
    rows.append(Row("transformers prompt lookup (end to end)", lookup, e2e, "transformers generate (e2e)", "tok/s"))
    cpp = _llama_cpp_rate(single, max_tokens, threads) if device == "cpu" else None
    variants = variants or select(None, device)
    engines = {name: _engine(path, dtype, threads, *v, device, unfused=name == UNFUSED, int4="int4" in name)
               for name, v in variants.items()}  # fmt: skip
    try:
        outputs, hf_rates = _interleaved(engines, hf, single, prompts[num_single : num_single + 1], params)
        hf_rate = aggregate_rate(hf_rates)  # every transformers run decodes max_tokens - 1 tokens
        for name, (speculator, _, _) in variants.items():
            outs, llm, ref = outputs[name], engines[name], _reference(name, outputs)
            reference = [o.token_ids for o in outputs[ref]]
            rate = aggregate_rate([o.metrics.decode_tokens_per_s for o in outs],
                                  [o.metrics.num_generated_tokens - 1 for o in outs])  # fmt: skip
            steps = sum(o.metrics.num_decode_steps for o in outs)
            per_step = sum(o.metrics.num_generated_tokens - 1 for o in outs) / max(steps, 1)
            same = sum(o.token_ids == r for o, r in zip(outs, reference, strict=True)) / len(outs)
            rows.append(Row(f"decode, SpecDesk {name}", rate, hf_rate, "transformers generate", "tok/s",
                            ">= 2x plain, >= 3x transformers" if name == "MLP + n-gram" else ""))  # fmt: skip
            rows.append(Row(f"  tokens per base step, {name}", per_step, None, "", "tok/step",
                            ">= 2.5" if name.startswith("MLP") and "n-gram" not in name else ""))  # fmt: skip
            rows.append(Row(f"  greedy output identical to {ref} ({dtype}), {name}", 100 * same, None, "", "%"))
            if cpp is not None:
                rows.append(Row(f"decode, SpecDesk {name}", rate, cpp, "llama.cpp (same GGUF)", "tok/s"))
            if speculator is not None:
                st = llm.stats()
                drafts = max(st.spec_num_drafts, 1)
                for i, n in enumerate(st.spec_accepted_per_position):
                    rows.append(Row(f"  acceptance of head {i + 1}, {name}", 100 * n / drafts, None, "", "%"))
                rows.append(Row(f"  draft nodes verified per step, {name}", st.spec_num_tree_nodes / drafts, None,
                                "", "nodes"))  # fmt: skip
                rows.append(Row(f"  measured cost of a verified token, {name}", 100 * st.spec_verify_cost_per_token,
                                None, "", "% of a step"))  # fmt: skip
    finally:
        for llm in engines.values():
            llm.shutdown()
    if with_load:
        rows += under_load(path, dtype, threads, prompts, max_tokens, device=device)
    rows += exactness_float32(path, threads, few, max_tokens, device, variants)
    return rows


def _interleaved(
    engines: dict[str, LLM], hf: Any, prompts: list[list[int]], warm: list[list[int]], params: SamplingParams
) -> tuple[dict[str, list[Any]], list[float]]:
    """Each conversation through every engine and transformers, in an order rotating by one per
    conversation: this machine drifts by tens of percent within minutes, which back-to-back blocks of one
    variant each would report as differences between variants."""
    for llm in engines.values():
        # Warm-up at full length (on a GPU, Triton compiles a kernel per new tree shape on first use) on a
        # conversation outside the timed ones; its reply is then forgotten by the n-gram store.
        llm.generate(warm or prompts[:1], params)
        llm.forget_replies()
    runners = [*engines, "transformers"]
    outputs: dict[str, list[Any]] = {name: [] for name in engines}
    hf_rates: list[float] = []
    for i, ids in enumerate(prompts):
        shift = i % len(runners)
        for name in runners[shift:] + runners[:shift]:
            if name == "transformers":
                hf_rates.append(hf.decode_tokens_per_s(ids, params.max_tokens))
            else:
                outputs[name].append(engines[name].generate([ids], params)[0])
    return outputs, hf_rates


def _reference(name: str, outputs: dict[str, Any]) -> str:
    """The plain variant a variant's output must equal: int4 variants have their own numerics."""
    return INT4_PLAIN if "int4" in name and INT4_PLAIN in outputs else "plain"


def exactness_float32(
    path: str, threads: int, prompts: list[list[int]], max_tokens: int, device: str = "cpu",
    variants: dict[str, Variant] | None = None,
) -> list[Row]:  # fmt: skip
    """The exactness claim, in float32 (bf16 batch shapes change rounding): every speculating variant vs plain."""
    params = SamplingParams(max_tokens=max_tokens)
    outputs: dict[str, list[list[int]]] = {}
    verifications: dict[str, int] = {}
    for name, variant in (variants or VARIANTS).items():
        if name == UNFUSED:
            continue
        # The gate opened for the whole batch: on a CPU it would otherwise keep 4 requests from speculating.
        llm = _engine(path, "float32", threads, *variant, device, int4="int4" in name,
                      spec_max_batch_size=len(prompts))  # fmt: skip
        try:
            outputs[name] = [o.token_ids for o in llm.generate(prompts, params)]
            verifications[name] = llm.stats().spec_num_drafts
        finally:
            llm.shutdown()
    rows = []
    for name, out in outputs.items():
        ref = _reference(name, outputs)
        if name != ref:
            same = 100 * sum(a == b for a, b in zip(out, outputs[ref], strict=True)) / len(out)
            rows.append(Row(f"greedy output identical to {ref} (float32), {name}", same, None, "", "%", "100 %"))
            rows.append(Row(f"  speculative verifications checked, {name}", verifications[name], None, "", "verify"))
    return rows


def under_load(
    path: str, dtype: str, threads: int, prompts: list[list[int]], max_tokens: int, reps: int = 4, device: str = "cpu"
) -> list[Row]:
    """8 and 16 concurrent conversations with speculation on (MLP + n-gram) vs off.

    Both engines stay loaded and their runs alternate, `reps` times each, in the order on-off, off-on, ...:
    this shared machine drifts by tens of percent within minutes (the same plain run measured 111 and 164
    tok/s ten minutes apart), which one run per engine, minutes apart, would report as a difference between
    them, and the mirrored order cancels a steady drift. The speculative steps taken under load are reported
    too: where the gate keeps speculation off, both engines run the same plain steps. Every run repeats
    the same conversations, so the n-gram store is emptied before each: a run may not look up the replies
    of an earlier identical one (pessimistic for a long-running server, whose store holds other chats).
    """
    engines = {"off": _engine(path, dtype, threads, None, device=device),
               "on": _engine(path, dtype, threads, "default", device=device)}  # fmt: skip
    rows = []
    try:
        for n in (8, 16):
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            for llm in engines.values():
                llm.generate(prompts[:n], params)  # warm-up at the timed shapes (GPU: Triton compiles)
            tokens = dict.fromkeys(engines, 0)
            seconds = dict.fromkeys(engines, 0.0)
            drafts_before = engines["on"].stats().spec_num_drafts
            for rep in range(reps):
                for key in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                    llm = engines[key]
                    llm.forget_replies()
                    start = time.perf_counter()
                    outs = llm.generate(prompts[:n], params)
                    seconds[key] += time.perf_counter() - start
                    tokens[key] += sum(len(o.token_ids) for o in outs)
            on, off = tokens["on"] / seconds["on"], tokens["off"] / seconds["off"]
            rows.append(Row(f"{n} concurrent, speculation on vs off (alternating runs)", on, off,
                            "speculation off", "tok/s", ">= 1x" if n == 16 else ""))  # fmt: skip
            drafts = (engines["on"].stats().spec_num_drafts - drafts_before) / reps
            rows.append(Row(f"  speculative verifications per run, {n} concurrent", drafts, None, "", "verify"))
    finally:
        for llm in engines.values():
            llm.shutdown()
    return rows


def _llama_cpp_rate(prompts: list[list[int]], max_tokens: int, threads: int) -> float | None:
    """llama.cpp decode tok/s on the shipped GGUF (its own Q4_1 kernels, as many threads as the rest of the
    run), or None when llama-cpp-python is not installed (`pip install -e ".[llama]"`, compiles ~5 min)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  llama-cpp-python not installed: skipping llama.cpp (pip install -e '.[llama]')")
        return None
    import tempfile
    from pathlib import Path

    from specdesk.engine.models.default_model import locate_gguf

    gguf = locate_gguf(Path(tempfile.mkdtemp()))
    model = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    rates = []
    for ids in prompts:
        start = time.perf_counter()
        first = None
        n = 0
        for _tok in model.generate(ids, temp=0.0):
            n += 1
            first = first or time.perf_counter()
            if n == max_tokens:
                break
        rates.append((n - 1) / (time.perf_counter() - (first or start)))
    return sum(rates) / len(rates)
