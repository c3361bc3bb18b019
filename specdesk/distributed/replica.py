"""One engine replica: an in-process `LLM` inside a Ray Serve replica, streaming deltas to the front end.

Replicas hold no conversation state besides their KV cache: each call carries the full prompt (the
front end renders it from the database), so any replica can serve any turn, and the one that served a
conversation's previous turn serves the next one fastest (its pages are cached). Deployed by
`distributed.app.build_app` with `max_ongoing_requests` = the engine's batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from specdesk.engine.async_stream import aiter_deltas
from specdesk.engine.llm_engine import EngineStats
from specdesk.engine.outputs import StreamDelta
from specdesk.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ReplicaInfo:
    """What the front end needs to know about the engine the replicas serve (all replicas are alike)."""

    model_name: str
    dtype_name: str
    max_model_len: int
    max_num_seqs: int
    block_size: int
    vocab_size: int
    speculator: str | None


@dataclass(frozen=True)
class ReplicaDelta:
    """A delta as it leaves a replica: which replica made it and, on the final one, that replica's stats
    (the front end sums the latest snapshot of each replica for /metrics)."""

    replica: str
    delta: StreamDelta
    stats: EngineStats | None = None


class EngineReplica:
    """The body of the engine deployment; `engine_kwargs` are `EngineConfig`'s fields (as `LLM(**kwargs)`)."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        from ray import serve

        from specdesk.engine.llm import LLM  # torch loads here, in the replica, never in the front end

        self.llm = LLM(**engine_kwargs)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        rank = getattr(context, "rank", None)
        self.rank: int | None = getattr(rank, "rank", rank)

    def info(self) -> ReplicaInfo:
        config = self.llm.config
        return ReplicaInfo(
            self.llm.model_name, self.llm.dtype_name, self.llm.max_model_len, config.max_num_seqs,
            config.block_size, self.llm.loaded.vocab_size, config.speculator,
        )  # fmt: skip

    def tokenizer(self) -> Any:
        """The model's tokenizer, pickled to the front end once: it renders prompts without a model."""
        return self.llm.tokenizer

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, cache_salt: str | None = None,
        output_prefix: list[int] | None = None,
    ) -> AsyncGenerator[ReplicaDelta, None]:  # fmt: skip
        """Stream one request's deltas. A caller that cancels the stream (Stop, client gone, front end
        gone) cancels this generator, and leaving `aiter_deltas` aborts the request (its pages are freed).
        `output_prefix`: the reply so far, when another replica died generating it."""
        try:
            request_id = self.llm.submit(prompt_ids, params, cache_salt, output_prefix)
        except (ValueError, RuntimeError) as exc:  # the front end checks first; this is the last line
            yield ReplicaDelta(self.name, StreamDelta("", "", [], True, None, None, str(exc)))
            return
        async with contextlib.aclosing(aiter_deltas(self.llm, [request_id])) as deltas:
            async for delta in deltas:
                yield ReplicaDelta(self.name, delta, self.llm.stats() if delta.finished else None)

    def stats(self) -> EngineStats:
        return self.llm.stats()

    def reset_prefix_cache(self) -> str:
        self.llm.reset_prefix_cache()
        return self.name

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes Ray replace the replica."""
        if self.llm.error is not None:
            raise RuntimeError(self.llm.error)

    def record_replica_metadata(self) -> dict[str, Any]:
        """Static facts the router reads: the rank names the replica's slot on the hash ring, and a
        replacement inherits its predecessor's rank (so only the dead replica's conversations move)."""
        return {"rank": self.rank, "name": self.name}

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
