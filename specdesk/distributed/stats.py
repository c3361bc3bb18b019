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
