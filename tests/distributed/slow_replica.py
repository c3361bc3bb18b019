"""An engine replica that paces its deltas, so a test can kill it mid-reply (imported by Ray workers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from specdesk.distributed.replica import EngineReplica, ReplicaDelta
from specdesk.engine.sampling_params import SamplingParams


class SlowReplica(EngineReplica):
    def __init__(self, engine_kwargs: dict[str, Any], delay_s: float = 0.02) -> None:
        super().__init__(engine_kwargs)
        self.delay_s = delay_s

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> AsyncGenerator[ReplicaDelta, None]:
        async for item in super().generate(prompt_ids, params, cache_salt):
            yield item
            await asyncio.sleep(self.delay_s)
