"""Conversation affinity vs Ray Serve's default routing: cached prompt tokens and turn latency.

    python -m benchmarks.affinity [--model PATH] [--replicas 2] [--conversations 10] [--turns 4]
                                  [--routers affinity,default,round-robin] [--max-tokens 32] [--out affinity.json]

Starts a local Ray cluster (127.0.0.1 only) with `--replicas` CPU engine replicas and runs the same
multi-turn conversations once per router, on fresh replicas each time (no run starts with a warm cache):

* `affinity`: `AffinityRouter`, every turn routed by its conversation id, as the console routes it;
* `default`: Ray Serve's default router (power of two choices: the shorter queue of two random replicas);
* `round-robin`: Ray Serve's round-robin router.

The conversations are the console's: customer messages from the prompt evaluation set (padded with
follow-ups to `--turns`), each under its domain's persona system prompt (specdesk.prompts.build_messages,
company and agent names from the default Settings, a customer name per conversation), the model's own
replies kept in the history, and the console's cache tenant. Conversations run concurrently (one thread
each, as agents work side by side); a conversation's turns run one after another.

Per router it reports the share of prompt tokens served from cache on turns >= 2 (where affinity
matters: turn 1 can at most reuse a persona's system prompt) and on all turns, turn latency p50/p90
(submit to the final delta, seen by the caller), time to first token p50, the turns each replica served,
and the turns that went to another replica than their conversation's previous turn ("moved"); `--out`
writes those and every turn's record as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdesk import prompts
from specdesk.app.auth import console_cache_salt
from specdesk.app.settings import Settings
from specdesk.distributed.affinity import routing_scope
from specdesk.engine.config import EngineConfig
from specdesk.engine.sampling_params import SamplingParams

ROUTERS = ("affinity", "default", "round-robin")
FOLLOW_UPS = (
    "Thanks. Can you check again? I still have not heard anything since Monday.",
    "Is there anything I need to do on my side, or will you sort it out?",
    "And is there any compensation for the trouble, since it took so long?",
    "Okay, please send me an email with all of that. Thank you for your help!",
)
CUSTOMER_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas")


@dataclass(frozen=True)
class Script:
    """One conversation to play: its persona, customer, and the customer's messages turn by turn."""

    persona: str
    customer_name: str
    customer_messages: tuple[str, ...]


@dataclass(frozen=True)
class TurnRecord:
    conversation: int
    turn: int  # 1 = the conversation's first turn
    num_prompt_tokens: int
    num_cached_tokens: int
    latency_s: float  # submit to the final delta, as the caller sees it
    ttft_s: float | None
    replica: str  # the replica that produced the reply's last token


def scripts(num_conversations: int, num_turns: int) -> list[Script]:
    """The evaluation set's conversations (repeating past its end), each padded to `num_turns` messages."""
    personas = {p.key for p in prompts.list_personas()}
    by_domain: dict[str, list[prompts.DatasetEntry]] = {}
    for entry in prompts.load_dataset("eval"):
        by_domain.setdefault(entry.domain, []).append(entry)
    # Domains interleaved (the set is grouped by domain), so a few conversations already mix personas.
    entries = [e for row in itertools.zip_longest(*by_domain.values()) for e in row if e is not None]
    out = []
    for i in range(num_conversations):
        entry = entries[i % len(entries)]
        said = [m["content"] for m in entry.messages if m["role"] == "user"][:num_turns]
        said += FOLLOW_UPS[: num_turns - len(said)]
        said += [FOLLOW_UPS[-1]] * (num_turns - len(said))
        persona = entry.domain if entry.domain in personas else "general"
        out.append(Script(persona, CUSTOMER_NAMES[i % len(CUSTOMER_NAMES)], tuple(said)))
    return out


def play(
    llm: Any, workload: Sequence[Script], params: SamplingParams, settings: Settings | None = None
) -> list[TurnRecord]:
    """Play every script on `llm` (a RemoteLLM), conversations concurrently, as the console sends turns:
    routed by conversation id, under the console's cache tenant. Raises the first turn that failed."""
    settings = settings or Settings()
    records: list[TurnRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def conversation(index: int, script: Script) -> None:
        variables = prompts.PromptVariables(settings.company, settings.agent_name, script.customer_name)
        history: list[dict[str, str]] = []
        try:
            for number, said in enumerate(script.customer_messages, 1):
                history.append({"role": "user", "content": said})
                messages = prompts.build_messages(script.persona, history, variables=variables)
                reply, record = _turn(llm, index, number, messages, params)
                history.append({"role": "assistant", "content": reply})
                with lock:
                    records.append(record)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=conversation, args=item) for item in enumerate(workload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sorted(records, key=lambda r: (r.conversation, r.turn))


def _turn(
    llm: Any, conversation: int, number: int, messages: list[dict[str, str]], params: SamplingParams
) -> tuple[str, TurnRecord]:
    start = time.perf_counter()
    # The console's routing key and cache tenant (ChatService: one tenant per agent; no login here).
    with routing_scope(f"conversation:{conversation}"):
        request_id = llm.submit(messages, params, cache_salt=console_cache_salt(None))
    request = llm._requests[request_id]  # which replicas served it: the benchmark's view inside RemoteLLM
    text, last = [], None
    for last in llm.deltas(request_id):
        text.append(last.text)
    latency = time.perf_counter() - start
    if last is None or last.error is not None or last.metrics is None:
        raise RuntimeError(f"conversation {conversation} turn {number} failed: {last}")
    m = last.metrics
    replica = request.replicas[-1]
    return "".join(text), TurnRecord(
        conversation, number, m.num_prompt_tokens, m.num_cached_tokens, latency, m.ttft_s, replica
    )


def summarize(router: str, records: Sequence[TurnRecord]) -> dict[str, Any]:
    """Cached share of prompt tokens (turns >= 2 and all turns), latency percentiles, turns per replica."""
    later = [r for r in records if r.turn >= 2]
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    replicas = Counter(r.replica for r in records)
    return {
        "router": router,
        "num_turns": len(records),
        "cached_share_turn2plus": _share(later),
        "cached_share_all": _share(records),
        "prompt_tokens_turn2plus": sum(r.num_prompt_tokens for r in later),
        "cached_tokens_turn2plus": sum(r.num_cached_tokens for r in later),
        "latency_p50_s": percentile([r.latency_s for r in records], 50),
        "latency_p90_s": percentile([r.latency_s for r in records], 90),
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "turns_per_replica": sorted(replicas.values(), reverse=True),
        "turns_moved": len(moved_turns(records)),
    }


def moved_turns(records: Sequence[TurnRecord]) -> list[TurnRecord]:
    """Turns served by another replica than their conversation's previous turn (so mostly uncached)."""
    previous = {(r.conversation, r.turn): r.replica for r in records}
    return [r for r in records if r.turn >= 2 and previous.get((r.conversation, r.turn - 1), r.replica) != r.replica]


def _share(records: Sequence[TurnRecord]) -> float:
    return sum(r.num_cached_tokens for r in records) / max(1, sum(r.num_prompt_tokens for r in records))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a measured turn)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def deploy(settings: Settings, num_replicas: int, router: str) -> Any:
    """Fresh engine replicas behind `router`, deployed as `specdesk.distributed.app` deploys them."""
    from ray import serve
    from ray.serve import Application
    from ray.serve.config import RequestRouterConfig

    from specdesk.distributed.app import ClusterConfig, engine_deployment

    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose from {ROUTERS}")
    app = engine_deployment(settings, ClusterConfig(num_replicas=num_replicas, round_robin=router == "round-robin"))
    if router == "default":
        # ClusterConfig offers affinity or round-robin; Ray's default is the same deployment, router unset.
        app = Application(app._bound_deployment.options(request_router_config=RequestRouterConfig()))
    # One application name per router: a process keeps one router per deployment id for its handles, so
    # a second run under the same name would still be routed by the first run's router.
    return serve.run(app, name=app_name(router), route_prefix=None)


def app_name(router: str) -> str:
    return f"affinity-bench-{router}"


def run(engine: EngineConfig, num_replicas: int, router: str, workload: Sequence[Script], max_tokens: int) -> dict:
    from ray import serve

    from specdesk.distributed.remote_llm import RemoteLLM

    settings = Settings(engine=engine)
    handle = deploy(settings, num_replicas, router)
    llm = asyncio.run(RemoteLLM.connect(handle, num_replicas=num_replicas))
    try:
        start = time.perf_counter()
        records = play(llm, workload, SamplingParams(max_tokens=max_tokens, ignore_eos=True), settings)
        wall_s = time.perf_counter() - start
    finally:
        llm.shutdown()
        serve.delete(app_name(router))
    return {**summarize(router, records), "wall_s": wall_s, "turns": [dataclasses.asdict(r) for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="reply length per turn (EOS ignored)")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=f"comma-separated, of {', '.join(ROUTERS)}")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if unknown := sorted(set(routers) - set(ROUTERS)):
        parser.error(f"unknown routers {unknown}; choose from {list(ROUTERS)}")

    import ray

    engine = EngineConfig(model=args.model, device="cpu", num_threads=1, max_num_seqs=8, speculator=None)
    workload = scripts(args.conversations, args.turns)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Every Ray process talks over loopback: by default its processes reach each other through the
    # host's network address (get_node_ip_address), which a loopback-only run must never use.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        num_cpus=args.replicas + 1, include_dashboard=False, _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
    )  # fmt: skip
    try:
        rows = [run(engine, args.replicas, router, workload, args.max_tokens) for router in routers]
    finally:
        ray.shutdown()
    print(f"{args.conversations} conversations x {args.turns} turns, {args.replicas} replicas, "
          f"{args.max_tokens} tokens per reply")  # fmt: skip
    print(f"{'router':<12} {'cached, turns>=2':>17} {'cached, all':>12} {'p50 s':>7} {'p90 s':>7} "
          f"{'ttft p50 s':>11} {'turns per replica':>18} {'moved':>6}")  # fmt: skip
    for row in rows:
        ttft = f"{row['ttft_p50_s']:.3f}" if row["ttft_p50_s"] is not None else "-"
        print(f"{row['router']:<12} {row['cached_share_turn2plus']:>17.1%} {row['cached_share_all']:>12.1%} "
              f"{row['latency_p50_s']:>7.3f} {row['latency_p90_s']:>7.3f} {ttft:>11} "
              f"{'/'.join(map(str, row['turns_per_replica'])):>18} {row['turns_moved']:>6}")  # fmt: skip
    if args.out is not None:
        config = {
            "model": args.model or "default", "replicas": args.replicas, "conversations": args.conversations,
            "turns": args.turns, "max_tokens": args.max_tokens, "max_num_seqs": engine.max_num_seqs,
        }  # fmt: skip
        args.out.write_text(json.dumps({"config": config, "routers": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
