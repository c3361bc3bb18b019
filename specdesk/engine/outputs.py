"""What the engine hands back: finished outputs, streamed deltas and per-request metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # aborted by the caller (Stop button, client gone)
    ERROR = "error"


@dataclass
class RequestMetrics:
    """Timings in seconds, counts in tokens. Filled by the engine as the request runs."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from cached pages (not prefilled)
    num_generated_tokens: int = 0
    num_decode_steps: int = 0  # base-model forward passes spent decoding this request
    num_preemptions: int = 0
    num_spec_steps: int = 0  # decode steps that verified a speculation
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    ttft_s: float | None = None
    decode_s: float = 0.0  # first token to last token

    @property
    def tokens_per_step(self) -> float:
        # The first token comes from prefill; every later one from a decode step (1 + accepted drafts).
        n = self.num_generated_tokens - 1
        return n / self.num_decode_steps if self.num_decode_steps and n > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill, so decode speed counts the tokens after it.
        n = self.num_generated_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["tokens_per_step"] = self.tokens_per_step
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability under the model's own distribution (log_softmax of the raw
    logits at its position), and the `top` most likely tokens there as (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """The whole result of one request (returned by `LLM.generate` and `LLM.chat`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs is set


@dataclass
class StreamDelta:
    """One increment of a streamed request: the text and token ids new since the last delta.

    The last delta of a stream has `finished=True`, a `finish_reason` and final metrics.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs is set
