"""The deployment's stats as /metrics reads them: counters never go down when a replica dies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from specdesk.app.metrics import EngineMetrics
from specdesk.distributed.remote_llm import RemoteLLM
from specdesk.distributed.replica import ReplicaInfo
from specdesk.engine.llm_engine import EngineStats


def _snapshot(steps: int, running: int = 0) -> EngineStats:
    return EngineStats(running, 0, 100, 90, 5, 2, 0.1, 10 * steps, 20 * steps, 1, steps,
                       spec_accepted_per_position=[steps, 1])  # fmt: skip


def test_a_dead_replicas_counters_stay_and_its_gauges_go() -> None:
    llm = RemoteLLM(None, ReplicaInfo("m", "float32", 512, 4, 16, 400, None), tokenizer=None, num_replicas=2)
    registry = CollectorRegistry(auto_describe=True)
    EngineMetrics(llm, registry)

    def scraped(name: str) -> float:
        line = next(x for x in generate_latest(registry).decode().splitlines() if x.startswith(f"specdesk:{name}"))
        return float(line.rsplit(" ", 1)[1])

    llm._record("a", _snapshot(1000, running=3))
    llm._record("b", _snapshot(200, running=1))
    assert scraped("engine_steps_total") == 1200 and scraped("num_requests_running") == 4
    llm._mark_dead("a", "replica a died")
    llm._record("b", _snapshot(300))
    # Prometheus would read 1200 -> 300 as a reset and count the 300 again: the dead replica's 1000 stay.
    assert scraped("engine_steps_total") == 1300 and scraped("prefix_cache_hits_total") == 13000
    assert scraped("num_requests_running") == 0 and scraped("kv_cache_pages_total") == 100  # b's own
    assert llm.stats().spec_accepted_per_position == [1300, 2]
    llm._record("a", _snapshot(5000))  # a late snapshot from the dead replica is not counted again
    assert scraped("engine_steps_total") == 1300
