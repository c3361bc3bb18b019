"""What every engine client builds on submit / deltas / abort: `stream`, `generate` and `chat`.

The in-process `LLM` and the Ray cluster's `RemoteLLM` both derive from `EngineClient`, so batching,
collecting and cleaning up after a failed request behave the same in one process and on a cluster.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from specdesk.engine.outputs import RequestMetrics, RequestOutput, StreamDelta, TokenLogprob
from specdesk.engine.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict[str, Any]]


class EngineClient(ABC):
    """`encode`, `stream`, `generate` and `chat` over a subclass's `tokenizer`, `apply_chat_template`,
    `submit`, `deltas` and `abort`."""

    tokenizer: Any

    @abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a prompt: a string (tokenized as the model's tokenizer does), ids, or chat messages."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give some text")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        raise ValueError(f"a prompt is a string, a list of token ids or a list of chat messages, got {prompt!r:.80}")

    @abstractmethod
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None) -> str: ...

    def prepare_grammar(self, params: SamplingParams) -> None:
        """Compile params' structured-output grammar ahead of `submit` (ValueError for a bad spec), so a caller
        can do it off its event loop; a no-op where the serving side compiles it."""
        return None

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

    def cancel(self, request_id: str) -> None:
        """Stop a submitted request whose deltas nobody has read nor will, and forget its stream (else its queue
        and final delta stay for good). A request whose `deltas` someone reads stops by closing that iterator."""
        if self._discard(request_id):
            self.abort(request_id)

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
        request_ids: list[str] = []
        outputs: list[RequestOutput] = []
        collecting = False
        try:  # a submit refused (its parameters) or a request failing: the rest of the batch stops, no stream left
            for ids, sp in zip(encoded, per_prompt, strict=True):
                request_ids.append(self.submit(ids, sp))
            collecting = True
            for rid, ids in zip(request_ids, encoded, strict=True):
                outputs.append(self._collect(rid, ids))
        finally:
            # The request being collected when one failed has closed its own stream; the others nobody reads.
            for rid in request_ids[len(outputs) + collecting :]:
                self.cancel(rid)
        return outputs

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer a conversation (role/content dicts) with the model's chat template applied."""
        return self.generate([messages], params)[0]

    def _collect(self, request_id: str, prompt_ids: list[int]) -> RequestOutput:
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = None
        last: StreamDelta | None = None
        for last in self.deltas(request_id):
            text.append(last.text)
            token_ids += last.token_ids
            if last.logprobs is not None:
                logprobs = logprobs or []
                logprobs += last.logprobs
        assert last is not None and last.finished, request_id
        if last.error:
            raise RuntimeError(f"request {request_id} failed: {last.error}")
        metrics = last.metrics or RequestMetrics()
        return RequestOutput(request_id, prompt_ids, token_ids, "".join(text), last.finish_reason, metrics, logprobs)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], model_name: str) -> list[int]:
    """Token ids of messages rendered with the model's chat template, ready for the assistant's reply.

    Only the template's own control tokens (`<|im_start|>`, BOS, ...) become control token ids. Text that
    merely spells one inside a message is encoded as ordinary text: otherwise a customer could close their
    turn and open a system turn by typing its markers. The rendered text already carries any BOS the
    template wants, so no special tokens are added again.
    """
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model {model_name} has no chat template; pass a plain prompt instead")
    from jinja2 import TemplateError  # transformers' own dependency

    try:
        return _render(tokenizer, messages)
    except TemplateError as exc:  # e.g. a template that raises on two assistant turns in a row: the caller's 400
        raise ValueError(f"model {model_name}'s chat template refused these messages: {exc}") from None


def _render(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    if "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters:
        # transformers marks control-token text in the messages before rendering, then encodes the marked
        # spans as plain text; a conversation without any encodes exactly as plain rendering.
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, sanitize_control_tokens=True
        )
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    # An older transformers cannot keep such text apart from the template's markers: refuse it.
    added = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t.strip()]
    for m in messages:
        found = next((t for t in added if isinstance(m["content"], str) and t in m["content"]), None)
        if found is not None:
            raise ValueError(f"a {m['role']} message contains the control token {found!r}: remove it")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


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


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError for logit_bias ids past the vocabulary (OpenAI's and vLLM's 400)."""
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab_size}: {bad[:5]}")
