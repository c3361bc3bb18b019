"""Prometheus `/metrics`: vLLM-style names, histograms fed by the engine's deltas, engine state on scrape."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import cast

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from specdesk.app.metrics import EngineMetrics, mount_metrics
from specdesk.engine.llm import LLM
from specdesk.engine.outputs import FinishReason, RequestMetrics, StreamDelta
from specdesk.engine.sampling_params import SamplingParams
from tests.app.live_server import NUM_BLOCKS, serve, tiny_llm, wait_idle


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_llm(tmp_path_factory.mktemp("metrics"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(llm: LLM) -> Iterator[str]:
    app = FastAPI()
    mount_metrics(app, llm)
    with serve(app) as base:
        yield base


def scrape(url: str) -> dict[str, float]:
    """Every sample as 'name{label=value,...}' -> value, model_name label left out for brevity."""
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_after_requests(url: str, llm: LLM) -> None:
    before = scrape(url)
    assert before["specdesk:num_requests_running"] == 0 and before["specdesk:num_requests_waiting"] == 0
    assert before["specdesk:kv_cache_pages_total"] == NUM_BLOCKS
    prompt = "Hello, thank you for contacting customer care. How can I help you today?"
    for _ in range(2):  # the second run reuses the first one's full pages
        llm.generate([prompt, "Where is my package?"], SamplingParams(max_tokens=32))
    wait_idle(llm)
    after = scrape(url)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("specdesk:time_to_first_token_seconds_count") == 4
    assert grew("specdesk:e2e_request_latency_seconds_count") == 4
    assert grew("specdesk:inter_token_latency_seconds_count") == 4 * 31  # per token, not per chunk
    assert grew("specdesk:generation_tokens_total") == 4 * 32
    assert grew("specdesk:request_success_total{finished_reason=length}") == 4
    assert grew("specdesk:prefix_cache_queries_total") > 0
    assert grew("specdesk:prefix_cache_hits_total") > 0
    assert grew("specdesk:prompt_tokens_cached_total") == grew("specdesk:prefix_cache_hits_total")
    assert after["specdesk:kv_cache_usage_perc"] == 0.0 and after["specdesk:kv_cache_pages_used"] == 0
    assert after["specdesk:kv_cache_pages_cached"] > 0
    assert "specdesk:num_preemptions_total" in after and "specdesk:kv_cache_pages_evicted_total" in after
    stats = llm.stats()
    assert after["specdesk:engine_steps_total"] == stats.num_steps
    assert after["specdesk:spec_decode_num_drafts_total"] == stats.spec_num_drafts > 0  # n-gram drafts
    assert after["specdesk:spec_decode_num_draft_tokens_total"] == stats.spec_num_draft_tokens
    assert after["specdesk:spec_decode_num_accepted_tokens_total"] == stats.spec_num_accepted_tokens
    per_pos = [v for k, v in after.items() if k.startswith("specdesk:spec_decode_num_accepted_tokens_per_pos_total")]
    assert sum(per_pos) == stats.spec_num_accepted_tokens


def test_gauges_show_a_running_request(url: str, llm: LLM) -> None:
    stream = cast(
        Generator[StreamDelta],
        llm.stream("Where is my package?", SamplingParams(max_tokens=400, ignore_eos=True)),
    )
    next(stream)
    live = scrape(url)
    stream.close()  # aborts: pages back
    assert live["specdesk:num_requests_running"] == 1
    assert live["specdesk:kv_cache_pages_used"] >= 1 and live["specdesk:kv_cache_usage_perc"] > 0
    wait_idle(llm)
    assert scrape(url)["specdesk:request_success_total{finished_reason=abort}"] >= 1


def test_listener_never_raises(llm: LLM) -> None:
    from prometheus_client import CollectorRegistry

    metrics = EngineMetrics(llm, CollectorRegistry())
    broken = RequestMetrics(num_generated_tokens=-1)  # Counter.inc(-1) raises inside prometheus_client
    metrics.on_delta(StreamDelta("x", "", [], True, FinishReason.STOP, broken))
    metrics.on_delta(StreamDelta("y", "", [], True, None, None, "boom"))
    metrics.on_delta(StreamDelta("z", "a", [1, 2], False))


def test_two_mounts_do_not_collide(llm: LLM) -> None:
    for _ in range(2):
        app = FastAPI()
        mount_metrics(app, llm)
        assert any(getattr(r, "path", None) == "/metrics" for r in app.routes)
