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
    python -m benchmarks.step_profile --threads 2 --quantization auto --second-turns --by-nodes --alternate
        # what 2x takes: the speculative steps by the nodes they verify, against plain turns run in between,
        # and each phase's ms by those nodes (where a verified node's time goes)
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from specdesk.engine import llm_engine
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams

Timings = collections.defaultdict[str, float]
_UNSET = object()  # an attribute the object's own namespace did not hold (a method of its class)


def _wrap(obj: Any, name: str, key: str, acc: Timings, sync: Callable[[], None], clock: Callable[[], float]) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        result = inner(*args, **kwargs)
        sync()
        acc[key] += clock() - start
        return result

    setattr(obj, name, timed)


def profile(
    llm: LLM, prompts: list[list[int]], max_tokens: int, sync: Callable[[], None], repetition_penalty: float = 1.0,
    temperature: float = 0.0, top_p: float = 1.0, decode_only: bool = False,
    record: list[tuple[int, int, float]] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:  # fmt: skip
    """`profile_legs` with one leg, the requests' default: ms per step of each phase, tokens per step, steps."""
    return profile_legs(llm, prompts, max_tokens, sync, repetition_penalty, temperature, top_p, decode_only, record,
                        clock)[None]  # fmt: skip


def profile_legs(
    llm: LLM,
    prompts: list[list[int]],
    max_tokens: int,
    sync: Callable[[], None],
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    decode_only: bool = False,
    record: list[tuple[int, int, float]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    legs: tuple[bool | None, ...] = (None,),
    phases: list[tuple[int, dict[str, float]]] | None = None,
) -> dict[bool | None, dict[str, float]]:
    """Per leg: ms per step of each phase (nested phases are included in their parents), tokens per step and
    the steps counted. decode_only: each request's prefill steps (through the one that emits its first token),
    which dominate the means on long prompts, left out of every figure. record: each counted step's (draft
    nodes verified, tokens emitted, seconds) is appended to it (`by_nodes`), except a plain leg's. clock: the
    timer (a test counts calls with it instead). legs: the requests' `speculate` per leg (None: SamplingParams'
    default); with two, each prompt runs in both, the order alternating prompt by prompt, so
    that both legs see the same machine: a shared machine drifts by 10-20 % over minutes, which biased
    by_nodes' plain reference where the plain engine ran first and alone. phases: beside each record entry,
    (its nodes, that step's ms per phase) (`phases_by_nodes`)."""
    engine = llm.engine
    acc: Timings = collections.defaultdict(float)
    wrapped: list[tuple[Any, str, str]] = [
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
        wrapped += [(spec, "propose", "propose drafts"), (spec, "accept", "accept (KV moves, stats, hidden)"),
                   (spec.width, "record", "  tree-width record")]  # fmt: skip
    # What the wrappers replace, put back when the profile ends: the engine (and verify_step, a module function)
    # as they were, for the next profile or engine.
    saved = [(obj, name, vars(obj).get(name, _UNSET)) for obj, name, _ in wrapped]
    try:
        return _profile(engine, wrapped, acc, prompts, max_tokens, sync, repetition_penalty, temperature, top_p,
                        decode_only, record, clock, legs, phases)  # fmt: skip
    finally:
        for obj, name, old in reversed(saved):
            if old is _UNSET:
                vars(obj).pop(name, None)  # a wrapper left in the instance's namespace, if it got that far
            else:
                setattr(obj, name, old)


def _profile(
    engine: Any, wrapped: list[tuple[Any, str, str]], acc: Timings, prompts: list[list[int]], max_tokens: int,
    sync: Callable[[], None], repetition_penalty: float, temperature: float, top_p: float, decode_only: bool,
    record: list[tuple[int, int, float]] | None, clock: Callable[[], float], legs: tuple[bool | None, ...],
    step_phases: list[tuple[int, dict[str, float]]] | None,
) -> dict[bool | None, dict[str, float]]:  # fmt: skip
    """`profile_legs`' run, with the engine's phases wrapped here (and put back by `profile_legs`)."""
    for obj, name, key in wrapped:
        _wrap(obj, name, key, acc, sync, clock)
    spec = engine.speculation

    def verified() -> int:  # draft nodes verified so far: the engine's own count (SpecStats)
        return spec.stats.num_tree_nodes if spec is not None else 0

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, repetition_penalty=repetition_penalty,
                            temperature=temperature, top_p=top_p)  # fmt: skip

    def run(ids: list[int], leg: bool | None) -> tuple[int, int, float]:
        """The prompt's steps and tokens counted, and their seconds (prefill's left out where decode_only)."""
        start, skipped = clock(), 0.0
        # Nothing carried over from an earlier run of the same prompt (the warm-up's, the other leg's): no cached
        # prompt pages, and no finished reply for the n-gram speculator to copy, which would inflate acceptance.
        engine.block_manager.reset_prefix_cache()
        engine.forget_replies()
        engine.add_request(ids, params if leg is None else replace(params, speculate=leg))
        steps = tokens = 0
        prefilled = not decode_only
        while engine.has_work:
            before, started, nodes = dict(acc), clock(), verified()
            deltas = engine.step()
            emitted = sum(len(d.token_ids) for d in deltas)
            if not prefilled:  # a prefill step (the last one emits the first token): out of every figure
                acc.clear()
                acc.update(before)
                skipped += clock() - started
                prefilled = emitted > 0
                continue
            steps += 1
            tokens += emitted
            if record is not None and leg is not False:
                seconds, verified_now = clock() - started, verified() - nodes
                record.append((verified_now, emitted, seconds))
                if step_phases is not None:
                    ms = {k: 1e3 * (v - before.get(k, 0.0)) for k, v in acc.items()}
                    step_phases.append((verified_now, {"step (total)": 1e3 * seconds, **ms}))
        return steps, tokens, clock() - start - skipped

    recorded: list[list[Any]] = [r for r in (record, step_phases) if r is not None]
    kept = [len(r) for r in recorded]
    for leg in legs:
        run(prompts[0], leg)  # warm-up (a GPU compiles its kernels here)
    for r, n in zip(recorded, kept, strict=True):
        del r[n:]  # the warm-up's steps
    sums: dict[bool | None, list[float]] = {leg: [0.0, 0.0, 0.0] for leg in legs}  # steps, tokens, seconds
    phase_sums: dict[bool | None, Timings] = {leg: collections.defaultdict(float) for leg in legs}
    for i, ids in enumerate(prompts):
        for leg in legs if i % 2 == 0 else legs[::-1]:
            acc.clear()
            for j, value in enumerate(run(ids, leg)):
                sums[leg][j] += value
            for key, seconds in acc.items():
                phase_sums[leg][key] += seconds
    out: dict[bool | None, dict[str, float]] = {}
    for leg, (counted, emitted, seconds) in sums.items():
        out[leg] = {"step (total)": 1e3 * seconds / counted, "tokens per step": emitted / counted, "steps": counted}
        out[leg].update({k: 1e3 * v / counted for k, v in phase_sums[leg].items()})
    return out


def by_nodes(record: list[tuple[int, int, float]], plain_ms: float) -> dict[str, Any]:
    """Decode steps of a speculative engine (each emits a token at least) grouped by the draft nodes their pass
    verified, against a plain step of plain_ms: per size, its steps, tokens per step, ms per step and speed
    against plain (tokens per ms over plain's); the least-squares fit ms = a + b N over the steps that verified
    nodes; the tokens per step a size needs for 2x at that fit (2 (a + b N) / plain_ms; 2 for a step of no
    nodes, a plain step); and two bounds for these drafts: every step verifying just the nodes it accepted, at
    the fitted cost (a + b (tokens - 1)) and a plain step's where none was; and the same with drafting itself
    free (plain_ms + b (tokens - 1): no proposal, no bookkeeping). Where fewer than two sizes verified nodes
    there is no fit: a, b, the 2x column and the bounds are None. On CUDA a graphed pass is padded to its
    bucket, so there the fit prices buckets, not nodes. With a fit, also what any drafts would need on this
    machine: the best chain's speed for a few per-draft acceptances (best_chain) and the acceptance 2x needs
    (acceptance_for); None without one."""
    if not record or any(e < 1 for _, e, _ in record):
        raise ValueError("by_nodes takes decode steps, each emitting a token at least (profile's decode_only)")
    sizes: dict[int, list[tuple[int, float]]] = collections.defaultdict(list)
    for n, emitted, seconds in record:
        sizes[n].append((emitted, 1e3 * seconds))
    fit = _fit([(float(n), 1e3 * s) for n, _, s in record if n > 0])
    rows = []
    for n in sorted(sizes):
        tokens, ms = sum(e for e, _ in sizes[n]), sum(m for _, m in sizes[n])
        needs = 2.0 if n == 0 else None if fit is None else 2 * (fit[0] + fit[1] * n) / plain_ms
        rows.append({"nodes": n, "steps": len(sizes[n]), "share": len(sizes[n]) / len(record),
                     "tokens per step": tokens / len(sizes[n]), "ms per step": ms / len(sizes[n]),
                     "speed vs plain": tokens * plain_ms / ms, "2x needs tokens per step": needs})  # fmt: skip
    tokens, ms = sum(e for _, e, _ in record), sum(1e3 * s for *_, s in record)
    oracle = free = chains = need = None
    if fit is not None:
        a, b = fit
        oracle = tokens * plain_ms / sum(plain_ms if e == 1 else a + b * (e - 1) for _, e, _ in record)
        free = tokens * plain_ms / sum(plain_ms + b * (e - 1) for _, e, _ in record)
        if a > 0 and b > 0:  # a slope of 0 or less (a noisy fit; on CUDA a bucket's) would price chains as free
            chains = {p: best_chain(p, a, b, plain_ms) for p in ACCEPTANCES}
            need = acceptance_for(2.0, a, b, plain_ms)
    return {"plain ms per step": plain_ms, "fit a (ms)": None if fit is None else fit[0],
            "fit b (ms per node)": None if fit is None else fit[1], "sizes": rows,
            "speed vs plain": tokens * plain_ms / ms, "accepted nodes only (bound)": oracle,
            "accepted nodes only, drafting free (bound)": free,
            "chains by acceptance": chains, "2x needs acceptance per draft": need}  # fmt: skip


ACCEPTANCES = (0.5, 0.6, 0.7, 0.8, 0.9)
MAX_CHAIN = 64  # drafts in a chain, at most: past it another draft adds less than p^64 of a token


def best_chain(p: float, a: float, b: float, plain_ms: float) -> tuple[float, int]:
    """(speed vs plain, k) of the best chain of k drafts at the fit's cost, each draft accepted with chance p
    where the ones before it were: a step then makes 1 + p + ... + p^k tokens on average in a + b k ms (k = 0
    is a plain step; a drafted one costs a plain step at least, whatever the fit says). What drafts that right
    would give on this machine, whoever drafts them."""
    best, tokens = (1.0, 0), 1.0
    for k in range(1, MAX_CHAIN + 1):
        tokens += p**k
        speed = tokens * plain_ms / max(a + b * k, plain_ms)
        best = (speed, k) if speed > best[0] else best  # a tie keeps the shorter chain
    return best


def acceptance_for(speed: float, a: float, b: float, plain_ms: float) -> tuple[float, int] | None:
    """The least per-draft acceptance p (to 1e-4) and its chain length at which best_chain reaches `speed` vs
    plain; None where no p below 1 does (perfect drafts of MAX_CHAIN tokens do not)."""
    if best_chain(1.0 - 1e-9, a, b, plain_ms)[0] < speed:
        return None
    lo, hi = 0.0, 1.0  # best_chain's speed grows with p: bisect
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best_chain(mid, a, b, plain_ms)[0] >= speed else (mid, hi)
    return hi, best_chain(hi, a, b, plain_ms)[1]


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x (plain float64 arithmetic), or None where x takes fewer than two values."""
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def phases_by_nodes(steps: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """Where a verified node's time goes: the speculative steps' ms per phase (profile_legs' `phases`), the mean
    per number of draft nodes verified, and each phase's fitted ms per node over the steps that verified any (a
    phase a step did not enter counts 0 there; None where fewer than two sizes verified nodes)."""
    names = list(dict.fromkeys(k for _, ms in steps for k in ms))
    sizes: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
    for n, ms in steps:
        sizes[n].append(ms)
    means = {n: {k: sum(ms.get(k, 0.0) for ms in sizes[n]) / len(sizes[n]) for k in names} for n in sorted(sizes)}
    per_node = {}
    for k in names:
        fit = _fit([(float(n), ms.get(k, 0.0)) for n, ms in steps if n > 0])
        per_node[k] = None if fit is None else fit[1]
    return {"phases": names, "steps": {n: len(sizes[n]) for n in means}, "mean ms": means, "ms per node": per_node}


def _print_phases_by_nodes(table: dict[str, Any]) -> None:
    names = table["phases"]
    print("\nms per step by phase, by draft nodes verified (the last row: each phase's fitted ms per node)\n")
    print("| nodes | steps | " + " | ".join(k.strip() for k in names) + " |\n|---|---|" + "---|" * len(names))
    for n, ms in table["mean ms"].items():
        print(f"| {n} | {table['steps'][n]} | " + " | ".join(f"{ms[k]:.2f}" for k in names) + " |")
    print("| per node | | " + " | ".join(_figure(table["ms per node"][k]) for k in names) + " |")


def _figure(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _print_by_nodes(table: dict[str, Any]) -> None:
    print(f"\nby draft nodes verified (plain step {table['plain ms per step']:.2f} ms; fit: "
          f"{_figure(table['fit a (ms)'])} ms + {_figure(table['fit b (ms per node)'])} ms per node)\n")  # fmt: skip
    print("| nodes | share of steps | tokens per step | ms per step | speed vs plain | 2x needs tokens per step |")
    print("|---|---|---|---|---|---|")
    for r in table["sizes"]:
        print(f"| {r['nodes']} | {r['share']:.0%} | {r['tokens per step']:.2f} | {r['ms per step']:.2f} | "
              f"{r['speed vs plain']:.2f}x | {_figure(r['2x needs tokens per step'])} |")  # fmt: skip
    print(f"\nall steps: {table['speed vs plain']:.2f}x plain; each step verifying only the nodes it accepted "
          f"(the fit's cost): {_figure(table['accepted nodes only (bound)'], 'x')}; and drafting free as well: "
          f"{_figure(table['accepted nodes only, drafting free (bound)'], 'x')}")  # fmt: skip
    if table["chains by acceptance"] is None:
        return
    print("\ndrafts of any source, as chains at the fit's cost, each draft accepted with chance p where the ones "
          "before it were:\n\n| p | best chain's speed vs plain | its drafts |\n|---|---|---|")  # fmt: skip
    for p, (speed, k) in table["chains by acceptance"].items():
        print(f"| {p} | {speed:.2f}x | {k} |")
    need = table["2x needs acceptance per draft"]
    need_text = "more than perfect drafts give" if need is None else f"p >= {need[0]:.3f} ({need[1]} drafts)"
    print(f"\n2x needs {need_text}")


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
    ap.add_argument("--by-nodes", action="store_true",
                    help="also group the speculative steps by the draft nodes they verified (by_nodes; "
                         "implies --decode-only)")  # fmt: skip
    ap.add_argument("--alternate", action="store_true",
                    help="one speculative engine; its plain leg is requests with speculate=False, the two legs "
                         "taking turns prompt by prompt, so that both see the same machine (by_nodes' plain "
                         "reference then drifts with the speculative steps it is compared with)")  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.bench import _eval_conversations, _first_user_turns

    use_sync = args.device == "cuda" if args.sync is None else args.sync
    sync = torch.cuda.synchronize if use_sync and args.device == "cuda" else (lambda: None)
    # Conversations 2 to n + 1, read once for both engines.
    messages = _first_user_turns(_eval_conversations(args.conversations), args.prompts + 1)[1:]
    results: dict[str, dict[str, float]] = {}
    record: list[tuple[int, int, float]] = []
    step_phases: list[tuple[int, dict[str, float]]] = []
    spec_name = f"speculative ({args.speculator})"
    # (engine's speculator, {leg: the result's name}); alternating: one engine, both legs.
    runs: list[tuple[str | None, dict[bool | None, str]]] = [
        (args.speculator, {False: "plain", True: spec_name})] if args.alternate else [
        (None, {None: "plain"}), (args.speculator, {None: spec_name})]  # fmt: skip
    for speculator, names in runs:
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
            legs = profile_legs(llm, prompts, args.max_tokens, sync, args.repetition_penalty, args.temperature,
                                args.top_p, decode_only=args.decode_only or args.second_turns or args.by_nodes,
                                record=record if speculator and args.by_nodes else None, legs=tuple(names),
                                phases=step_phases)  # fmt: skip
            results.update({names[leg]: legs[leg] for leg in names})
        finally:
            llm.engine.close()
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"benchmarks.step_profile: {args.device}, {args.dtype}, ms per engine step (sync: {use_sync})\n")
    print("| phase | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for key in keys:
        digits = 0 if key == "steps" else 2  # a count, not ms
        print(f"| {key} | " + " | ".join(f"{r.get(key, 0.0):.{digits}f}" for r in results.values()) + " |")
    extra: dict[str, Any] = {}
    if args.by_nodes and record:
        extra["by nodes"] = by_nodes(record, results["plain"]["step (total)"])
        _print_by_nodes(extra["by nodes"])
        extra["phases by nodes"] = phases_by_nodes(step_phases)
        _print_phases_by_nodes(extra["phases by nodes"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, **extra}, f, indent=2)


if __name__ == "__main__":
    main()
