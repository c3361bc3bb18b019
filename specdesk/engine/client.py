"""What every engine client builds on submit / deltas / abort: `stream`, `generate` and `chat`.

The in-process `LLM` and the Ray cluster's `RemoteLLM` both derive from `EngineClient`, so batching,
collecting and cleaning up after a failed request behave the same in one process and on a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from specdesk.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from specdesk.engine.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict[str, Any]]


class EngineClient(ABC):
    """`stream`, `generate` and `chat` over a subclass's `encode`, `submit`, `deltas` and `abort`."""

    @abstractmethod
    def encode(self, prompt: Prompt) -> list[int]: ...

    @abstractmethod
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None) -> str: ...

    @abstractmethod
    def deltas(self, request_id: str) -> Iterator[StreamDelta]: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def _check_prompt(self, token_ids: list[int]) -> None:
        """Raise ValueError for a prompt the engine can never serve (in the caller's thread)."""

    @abstractmethod
    def _discard(self, request_id: str) -> bool:
        """Forget a submitted request whose deltas nobody will read; True if it was still open."""

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None
    ) -> Iterator[StreamDelta]:
        """Stream one request's text as it is verified. Closing the generator (client gone) aborts it."""
        return self.deltas(self.submit(prompt, params, cache_salt))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch of prompts together (continuous batching) and return their outputs in order.

        params: one SamplingParams for all prompts, or one per prompt (as vLLM accepts). A request that
        fails raises RuntimeError, and the batch's requests not yet collected are stopped.
        """
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int | dict))
        batch: list[Any] = [prompts] if single else list(prompts)
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(batch)} prompts")
        encoded = [self.encode(p) for p in batch]
        for ids in encoded:
            self._check_prompt(ids)
        request_ids = [self.submit(ids, sp) for ids, sp in zip(encoded, per_prompt, strict=True)]
        outputs: list[RequestOutput] = []
        try:
            for rid, ids in zip(request_ids, encoded, strict=True):
                outputs.append(self._collect(rid, ids))
        finally:
            # One failed request raises here: the batch's uncollected requests stop and leave no stream.
            for rid in request_ids[len(outputs) + 1 :]:
                if self._discard(rid):
                    self.abort(rid)
        return outputs

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer a conversation (role/content dicts) with the model's chat template applied."""
        return self.generate([messages], params)[0]

    def _collect(self, request_id: str, prompt_ids: list[int]) -> RequestOutput:
        text: list[str] = []
        token_ids: list[int] = []
        last: StreamDelta | None = None
        for last in self.deltas(request_id):
            text.append(last.text)
            token_ids += last.token_ids
        assert last is not None and last.finished, request_id
        if last.error:
            raise RuntimeError(f"request {request_id} failed: {last.error}")
        metrics = last.metrics or RequestMetrics()
        return RequestOutput(request_id, prompt_ids, token_ids, "".join(text), last.finish_reason, metrics)


def check_prompt_ids(token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError for an empty prompt, one that leaves no room to generate, or unknown token ids."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("prompt is empty: give at least one token")
    if n >= max_model_len:
        raise ValueError(
            f"prompt has {n} tokens but the context window is {max_model_len}: "
            "shorten the conversation (at least one token must be left to generate)"
        )
    bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be integers in the vocabulary [0, {vocab_size}), got {bad[:5]}")
