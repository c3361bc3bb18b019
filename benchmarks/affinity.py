"""Conversation affinity vs round-robin routing on Ray Serve: cached prompt tokens and turn latency.

    python -m benchmarks.affinity [--model PATH] [--replicas 2] [--conversations 16] [--turns 4]

Starts a local Ray cluster (127.0.0.1 only) with `--replicas` CPU engine replicas, runs the same
multi-turn conversations twice, once behind `AffinityRouter` and once behind Ray Serve's round-robin
router (fresh replicas each time, so neither run starts with a warm cache), and prints, per router,
the share of prompt tokens served from cache and the median and p90 turn latency. Turns of different
conversations run concurrently (one thread per conversation), as agents' turns do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from specdesk.app.settings import Settings
from specdesk.engine.config import EngineConfig
from specdesk.engine.sampling_params import SamplingParams

FOLLOW_UPS = [
    "Thanks. Can you check again? The tracking page still shows nothing since Monday.",
    "I also want to change the delivery address to my office, is that possible?",
    "And will I get a refund for the shipping fee, since it is late?",
    "Okay, please send me an email with all of that. Thank you for your help!",
]


def run(model: str | None, num_replicas: int, num_conversations: int, num_turns: int, round_robin: bool) -> dict:
    from ray import serve

    from specdesk.distributed.app import ClusterConfig, engine_deployment
    from specdesk.distributed.remote_llm import RemoteLLM

    engine = EngineConfig(model=model, device="cpu", num_threads=1, max_num_seqs=8, speculator=None)
    cluster = ClusterConfig(num_replicas=num_replicas, round_robin=round_robin)
    handle = serve.run(engine_deployment(Settings(engine=engine), cluster), name="bench", route_prefix=None)
    llm = asyncio.run(RemoteLLM.connect(handle, num_replicas=num_replicas))
    latencies: list[float] = []
    prompt_tokens = cached_tokens = 0
    lock = threading.Lock()

    def conversation(i: int) -> None:
        nonlocal prompt_tokens, cached_tokens
        messages = [
            {"role": "system", "content": "You are a courteous customer-care agent for Northwind."},
            {"role": "user", "content": f"Hello, my order {48213 + i} has not arrived yet. Where is my package?"},
        ]
        for turn in range(num_turns):
            start = time.perf_counter()
            out = llm.chat(messages, SamplingParams(max_tokens=32, ignore_eos=True))
            with lock:
                latencies.append(time.perf_counter() - start)
                prompt_tokens += out.metrics.num_prompt_tokens
                cached_tokens += out.metrics.num_cached_tokens
            messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": FOLLOW_UPS[turn % 4]}]

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(num_conversations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    llm.shutdown()
    serve.delete("bench")
    latencies.sort()
    return {
        "router": "round-robin" if round_robin else "affinity",
        "cached_share": cached_tokens / max(1, prompt_tokens),
        "p50_s": statistics.median(latencies),
        "p90_s": latencies[int(0.9 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        rows = [run(args.model, args.replicas, args.conversations, args.turns, rr) for rr in (False, True)]
    finally:
        ray.shutdown()
    print(f"{'router':<12} {'cached prompt tokens':>21} {'turn p50 s':>11} {'turn p90 s':>11}")
    for row in rows:
        print(f"{row['router']:<12} {row['cached_share']:>20.1%} {row['p50_s']:>11.3f} {row['p90_s']:>11.3f}")


if __name__ == "__main__":
    main()
