"""Engine stats of several replicas as one: what /metrics shows for the whole deployment."""

from __future__ import annotations

import dataclasses
from itertools import zip_longest

from specdesk.engine.llm_engine import EngineStats

# Ratios and costs: averaged over replicas (a sum would mean nothing); every other field is summed.
_AVERAGED = frozenset({"kv_usage", "spec_verify_cost_per_token"})


def sum_stats(snapshots: list[EngineStats]) -> EngineStats:
    """Counters and gauges summed, ratios averaged; all zero for no snapshot."""
    if not snapshots:
        return EngineStats(0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0)
    values: dict[str, object] = {}
    for f in dataclasses.fields(EngineStats):
        column = [getattr(s, f.name) for s in snapshots]
        if f.name in _AVERAGED:
            values[f.name] = sum(column) / len(column)
        elif isinstance(column[0], list):
            values[f.name] = [sum(x) for x in zip_longest(*column, fillvalue=0)]
        else:
            values[f.name] = sum(column)
    return EngineStats(**values)  # type: ignore[arg-type]


# What a replica holds now: gone with it when it dies. Every other field counts up for the life of a replica.
_GAUGES = frozenset({
    "num_running", "num_waiting", "num_blocks", "num_free_blocks", "num_cached_blocks", "kv_usage",
    "spec_verify_cost_per_token",
})  # fmt: skip


def with_retired(live: EngineStats, retired: EngineStats | None) -> EngineStats:
    """`live`'s gauges, and its counters plus those of replicas that died (`retired`): a counter Prometheus
    scrapes never goes down when a replica goes (it would read the drop as a reset and count the rest again)."""
    if retired is None:
        return live
    values: dict[str, object] = {}
    for f in dataclasses.fields(EngineStats):
        now, gone = getattr(live, f.name), getattr(retired, f.name)
        if f.name in _GAUGES:
            values[f.name] = now
        elif isinstance(now, list):
            values[f.name] = [a + b for a, b in zip_longest(now, gone, fillvalue=0)]
        else:
            values[f.name] = now + gone
    return EngineStats(**values)  # type: ignore[arg-type]
