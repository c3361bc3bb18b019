"""Load test for the OpenAI-compatible API: N concurrent streaming chat clients on loopback, for a bounded
time, reporting requests served, errors, time to first token, latency and tokens/s percentiles.

    python -m benchmarks.loadtest --url http://127.0.0.1:7860 --clients 8 --duration 30 --max-tokens 64

Each client sends one streaming request at a time (with `stream_options.include_usage`) and starts the
next as soon as the previous ends, until `--duration` is over; requests still running then get
`--grace` seconds to finish and are cancelled after that (reported as unfinished, not as errors).
Throughput counts tokens (the server's usage), never chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "My order 48213 has not arrived yet. Where is my package?",
    "I would like to reset my password; the login page says my account is locked.",
    "Can I get a refund for a damaged item? The box was crushed and the lamp is broken.",
    "The invoice shows a charge of $29.99 for the premium plan. How do I cancel?",
    "How long does shipping take to Canada, and can I change the delivery address?",
    "Please explain your return policy for opened electronics.",
    "I was charged twice for the same order. What should I do?",
    "Do you offer a discount for annual billing on the team plan?",
]
SYSTEM = "You are a helpful, concise customer-care agent."


@dataclass
class Sample:
    """One finished request as the client saw it."""

    ttft_s: float
    latency_s: float
    num_tokens: int
    tokens_per_step: float | None = None

    @property
    def decode_tokens_per_s(self) -> float | None:
        # The first token's time is TTFT (prefill); decode speed counts the tokens after it.
        decode_s = self.latency_s - self.ttft_s
        return (self.num_tokens - 1) / decode_s if self.num_tokens > 1 and decode_s > 0 else None


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    num_unfinished: int = 0
    elapsed_s: float = 0.0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, temperature: float
) -> Sample:
    """Stream one chat completion; raise on an HTTP error or an error event."""
    body = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": max_tokens, "temperature": temperature,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
    }  # fmt: skip
    start = time.perf_counter()
    first: float | None = None
    num_tokens: int | None = None
    tokens_per_step: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
                extra = choice.get("specdesk")
                if extra:
                    tokens_per_step = extra.get("tokens_per_step")
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if num_tokens is None:
        raise RuntimeError("stream ended without a usage chunk")
    return Sample((first or end) - start, end - start, num_tokens, tokens_per_step)


async def run(
    url: str, clients: int, duration_s: float, max_tokens: int, temperature: float = 0.0,
    model: str | None = None, api_key: str | None = None, grace_s: float = 30.0,
) -> Results:  # fmt: skip
    """Drive `clients` streaming clients against `url` for `duration_s` seconds and collect results."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(duration_s + grace_s + 30, connect=10)
    results = Results()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        start = time.perf_counter()
        deadline = start + duration_s
        in_flight = [0]

        async def client_loop(index: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                prompt = PROMPTS[(index + n) % len(PROMPTS)]
                n += 1
                in_flight[0] += 1
                try:
                    results.samples.append(await one_request(client, model, prompt, max_tokens, temperature))
                except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as exc:
                    results.errors.append(f"{type(exc).__name__}: {exc}")
                finally:
                    in_flight[0] -= 1

        tasks = [asyncio.create_task(client_loop(i)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + grace_s)
        results.num_unfinished = in_flight[0]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results.elapsed_s = time.perf_counter() - start
    return results


def summarize(results: Results) -> dict[str, Any]:
    """Numbers for the report: counts, throughput and p50/p90/p99 of each per-request measure."""
    s = results.samples
    num_tokens = sum(x.num_tokens for x in s)

    def pcts(values: list[float], scale: float = 1.0, digits: int = 1) -> dict[str, float]:
        return {f"p{q}": round(percentile(values, q) * scale, digits) for q in (50, 90, 99)}

    steps = [x.tokens_per_step for x in s if x.tokens_per_step]
    return {
        "requests": len(s),
        "errors": len(results.errors),
        "unfinished": results.num_unfinished,
        "elapsed_s": round(results.elapsed_s, 2),
        "requests_per_s": round(len(s) / results.elapsed_s, 3) if results.elapsed_s else 0.0,
        "output_tokens": num_tokens,
        "output_tokens_per_s": round(num_tokens / results.elapsed_s, 1) if results.elapsed_s else 0.0,
        "ttft_ms": pcts([x.ttft_s for x in s], 1000),
        "latency_s": pcts([x.latency_s for x in s], 1, 3),
        "decode_tokens_per_s_per_request": pcts([v for x in s if (v := x.decode_tokens_per_s) is not None]),
        "mean_tokens_per_step": round(sum(steps) / len(steps), 3) if steps else None,
        "first_errors": results.errors[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="server base URL (loopback only)")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent streaming clients (1-{MAX_CLIENTS})")
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help=f"seconds to keep starting requests (max {MAX_DURATION_S:g})",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model", default=None, help="model id (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="bearer key if the server requires one")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after --duration")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname or ""
    if host not in LOOPBACK:
        parser.error(f"--url must point at this machine ({', '.join(sorted(LOOPBACK))}), got {host!r}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if not 0 < args.duration <= MAX_DURATION_S or not 0 <= args.grace <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] and --grace in [0, {MAX_DURATION_S:g}]")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    results = asyncio.run(
        run(
            args.url,
            args.clients,
            args.duration,
            args.max_tokens,
            args.temperature,
            args.model,
            args.api_key,
            args.grace,
        )
    )
    summary = summarize(results)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"clients={args.clients} duration={args.duration:g}s max_tokens={args.max_tokens} url={args.url}")
        for key, value in summary.items():
            print(f"  {key:34s} {value}")
    return 0 if summary["requests"] and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
