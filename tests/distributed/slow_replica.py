"""An engine replica that paces its deltas, so a test can kill it mid-reply (imported by Ray workers).

`hold`: while a file of that path exists, a replica being started waits (at most HOLD_MAX_S) before
it loads its engine, so a test decides when Ray's replacement for a killed replica comes up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from specdesk.distributed.replica import EngineReplica, ReplicaDelta
from specdesk.engine.sampling_params import SamplingParams

HOLD_MAX_S = 120.0


class SlowReplica(EngineReplica):
    def __init__(self, engine_kwargs: dict[str, Any], delay_s: float = 0.02, hold: str | None = None) -> None:
        deadline = time.monotonic() + HOLD_MAX_S
        while hold is not None and Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        super().__init__(engine_kwargs)
        self.delay_s = delay_s

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, cache_salt: str | None = None,
        output_prefix: list[int] | None = None,
    ) -> AsyncGenerator[ReplicaDelta, None]:  # fmt: skip
        async for item in super().generate(prompt_ids, params, cache_salt, output_prefix):
            yield item
            await asyncio.sleep(self.delay_s)
