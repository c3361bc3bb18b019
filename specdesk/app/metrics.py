"""Prometheus metrics at `/metrics`, named as vLLM names them with a `specdesk:` prefix.

Two sources, chosen by what each number is:
  * per-request timings and token counts come from the engine's delta listener (`LLM.add_listener`),
    observed once per request from the engine's own clock when its final delta arrives, plus an
    inter-token gap for every delta that carries tokens;
  * engine state (running/waiting, pages, prefix-cache, preemption and speculation counters) is read
    from `LLM.stats()` at scrape time, so a scrape always shows the present and nothing can drift.

Every series carries a `model_name` label, as vLLM's do, so dashboards built for vLLM work unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specdesk.app.auth import ApiKeys
from specdesk.engine.outputs import StreamDelta

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

log = logging.getLogger(__name__)

PREFIX = "specdesk:"
# vLLM's bucket edges, so the same dashboards and alert thresholds apply.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


def mount_metrics(app: FastAPI, llm: LLM, api_keys: list[str] | None = None) -> None:
    """Serve Prometheus text format for `llm` at `GET /metrics` on `app` (plain FastAPI or Gradio's).

    `api_keys`: None leaves /metrics open; otherwise a scrape needs `Authorization: Bearer <one of them>`
    (Prometheus: `authorization: {credentials: ...}` in the scrape config). Each call gets its own
    registry, so mounting twice (tests, several apps) never collides.
    """
    if api_keys is not None and not any(api_keys):
        raise ValueError("mount_metrics: api_keys is empty; pass None for an open /metrics")
    keys = ApiKeys(api_keys) if api_keys is not None else None
    registry = CollectorRegistry(auto_describe=True)
    metrics = EngineMetrics(llm, registry)
    llm.add_listener(metrics.on_delta)

    async def scrape(request: Request) -> Response:
        if keys is not None and keys.tenant(request.headers.get("authorization")) is None:
            error = {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None}
            return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, status_code=401)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False)


class EngineMetrics(Collector):
    """Request histograms and counters fed by the delta listener; engine gauges collected on scrape."""

    def __init__(self, llm: LLM, registry: CollectorRegistry) -> None:
        self.llm = llm
        self.model_name = llm.model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between generated tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.cached_tokens = counter("prompt_tokens_cached", "Prompt tokens served from cached pages.")
        self.success = counter("request_success", "Finished requests by reason.", ("finished_reason",))
        self._last_token_time: dict[str, float] = {}
        self._failed_once = False
        registry.register(self)

    # ---- listener (engine thread: cheap, never raises) ------------------------------------------
    def on_delta(self, delta: StreamDelta) -> None:
        try:
            self._observe(delta)
        except Exception:  # a metrics bug must never take the engine loop down
            if not self._failed_once:
                self._failed_once = True
                log.exception("metrics listener failed; later failures are not logged")

    def _observe(self, delta: StreamDelta) -> None:
        rid, model = delta.request_id, self.model_name
        if delta.token_ids:
            now = time.perf_counter()
            last = self._last_token_time.get(rid)
            if last is not None:
                # One step can verify several tokens: spread the gap so this stays per token, not per chunk.
                gap = (now - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.itl.labels(model).observe(gap)
            self._last_token_time[rid] = now
        if not delta.finished:
            return
        self._last_token_time.pop(rid, None)
        reason = "error" if delta.error else (delta.finish_reason.value if delta.finish_reason else "stop")
        self.success.labels(model, reason).inc()
        m = delta.metrics
        if m is None:
            return
        if m.ttft_s is not None:
            self.ttft.labels(model).observe(m.ttft_s)
        if m.finish_time is not None and m.arrival_time:
            self.e2e.labels(model).observe(m.finish_time - m.arrival_time)
        self.prompt_tokens.labels(model).inc(m.num_prompt_tokens)
        self.generation_tokens.labels(model).inc(m.num_generated_tokens)
        self.cached_tokens.labels(model).inc(m.num_cached_tokens)

    # ---- scrape-time engine state ----------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        s = self.llm.stats()
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV pages held by live requests (1 = full).", s.kv_usage)
        yield gauge("kv_cache_pages_total", "KV pages in the pool.", s.num_blocks)
        yield gauge("kv_cache_pages_used", "KV pages held by live requests.", s.num_blocks - s.num_free_blocks)
        yield gauge("kv_cache_pages_cached", "KV pages holding a hashed, reusable prefix.", s.num_cached_blocks)
        yield counter("kv_cache_pages_evicted", "Cached pages evicted to make room.", s.num_evicted_blocks)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queried_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens)
        yield counter("num_preemptions", "Requests preempted for lack of pages.", s.num_preemptions)
        yield counter("engine_steps", "Engine iterations run.", s.num_steps)
        yield counter("spec_decode_num_drafts", "Decode steps that verified a speculation.", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Speculated tokens checked.", s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculated tokens accepted.", s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Accepted tokens by draft position.",
            labels=["model_name", "position"],
        )  # fmt: skip
        for position, n in enumerate(s.spec_accepted_per_position):
            per_pos.add_metric([self.model_name, str(position)], n)
        yield per_pos
