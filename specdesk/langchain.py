"""`ChatSpecDesk`: a LangChain chat model over the in-process engine (no server, no network).

    from specdesk.langchain import ChatSpecDesk
    chat = ChatSpecDesk(max_tokens=128)                    # built-in default model, loaded on first use
    chat.invoke("Where is my parcel?")
    for chunk in chat.stream([("system", "Be brief."), ("human", "Hi")]): print(chunk.content, end="")
    chat = ChatSpecDesk(llm=service.llm)                   # share the console's engine

Text in, text out: tool calling, structured output and non-text content are not supported and say so.
Concurrent calls (`batch`, `abatch`, several threads or tasks) are batched together by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, model_validator

from specdesk.engine.async_stream import aiter_deltas
from specdesk.engine.outputs import StreamDelta
from specdesk.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "user": "user", "assistant": "assistant"}
# One engine per configuration per process: LangChain builds model objects freely (one per chain, per
# test), and each engine owns the model weights and a KV pool.
_ENGINES: dict[tuple[Any, ...], LLM] = {}
_ENGINES_LOCK = threading.Lock()


class ChatSpecDesk(BaseChatModel):
    """LangChain chat model backed by a SpecDesk `LLM` in this process.

    Constructing one is cheap: the engine is created on first use (or given as `llm=`), and instances
    with the same `model`, `speculator` and `engine_kwargs` share one engine. Sampling fields can be
    overridden per call, e.g. `chat.invoke(msgs, temperature=0.7, max_tokens=32)`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | None = None
    """Checkpoint path, hub id or GGUF file; None means the built-in default. Ignored when `llm` is given."""
    llm: Any = Field(default=None, exclude=True)
    """An existing `specdesk.engine.llm.LLM` to use (e.g. the console's), instead of building one."""
    speculator: str | None = None
    """Speculator for a newly built engine (EngineConfig.speculator); None keeps the engine's default."""
    max_tokens: int = 256
    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    speculate: bool = True
    """False turns speculation off for these calls while keeping the engine's speculator loaded."""
    streaming: bool = False
    """Make `invoke` stream internally (callbacks get tokens)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other EngineConfig fields for a newly built engine (dtype, device, num_blocks, ...)."""
    timeout: float | None = None
    """Accepted for LangChain's standard parameters; there is no network call to time out."""
    max_retries: int = 0
    """Accepted for LangChain's standard parameters; in-process calls are not retried."""

    @model_validator(mode="after")
    def _check(self) -> ChatSpecDesk:
        # SamplingParams owns the ranges: fail at construction, with its message, not at the first call.
        self._sampling_params(None, {})
        if self.llm is not None and self.speculator not in (None, self.llm.config.speculator):
            raise ValueError(
                f"speculator={self.speculator!r} differs from the given engine's "
                f"({self.llm.config.speculator!r}); build the LLM with it instead"
            )
        return self

    @property
    def _llm_type(self) -> str:
        return "specdesk"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_name(), "speculator": self.speculator, **self._default_params()}

    def _default_params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "ignore_eos": self.ignore_eos,
            "speculate": self.speculate,
        }  # fmt: skip

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "specdesk"
        params["ls_model_name"] = kwargs["model"] if isinstance(kwargs.get("model"), str) else self._model_name()
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ---- engine --------------------------------------------------------------------------------
    def _model_name(self) -> str:
        if self.llm is not None:
            return str(self.llm.loaded.name)
        built = _ENGINES.get(self._engine_key())
        if built is not None:
            return built.loaded.name
        if self.model is not None:
            return self.model
        from specdesk.engine.models.default_model import DEFAULT_MODEL_NAME  # the models package imports torch

        return DEFAULT_MODEL_NAME

    def _engine_key(self) -> tuple[Any, ...]:
        return (self.model, self.speculator, tuple(sorted(self.engine_kwargs.items())))

    def _engine(self) -> LLM:
        if self.llm is not None:
            return cast("LLM", self.llm)
        key = self._engine_key()
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                from specdesk.engine.llm import LLM  # torch and the model load on first use, never at import

                kwargs = dict(self.engine_kwargs)
                if self.speculator is not None:  # None keeps the engine's own default
                    kwargs["speculator"] = self.speculator
                _ENGINES[key] = LLM(model=self.model, **kwargs)
            return _ENGINES[key]

    def _sampling_params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> SamplingParams:
        model = kwargs.get("model")
        if model is not None and model not in (self.model, self._model_name()):
            raise ValueError(f"this ChatSpecDesk serves {self._model_name()!r}, not {model!r}")
        p = {**self._default_params(), **{k: v for k, v in kwargs.items() if k in self._default_params()}}
        stops = [*(self.stop or []), *(stop or [])]
        return SamplingParams(
            temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"], max_tokens=p["max_tokens"],
            seed=p["seed"], stop=tuple(dict.fromkeys(stops)), ignore_eos=p["ignore_eos"],
            speculate=p["speculate"],
        )  # fmt: skip

    # ---- generation ----------------------------------------------------------------------------
    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:  # fmt: skip
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:  # fmt: skip
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:  # fmt: skip
        params = self._sampling_params(stop, kwargs)
        llm = self._engine()
        prompt_ids = llm.encode(to_chat_dicts(messages))
        deltas = cast(Generator[StreamDelta, None, None], llm.deltas(llm.submit(prompt_ids, params)))
        with contextlib.closing(deltas):  # the caller stopping early aborts the request (pages freed)
            num_tokens = 0
            for delta in deltas:
                num_tokens += len(delta.token_ids)
                chunk = self._chunk(delta, len(prompt_ids), num_tokens)
                if chunk is None:
                    continue
                if run_manager and delta.text:
                    run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
        params = self._sampling_params(stop, kwargs)
        # Loading the engine and tokenizing are blocking work: keep them off the event loop.
        llm = await asyncio.to_thread(self._engine)
        prompt_ids = await asyncio.to_thread(llm.encode, to_chat_dicts(messages))
        request_id = llm.submit(prompt_ids, params)
        async with contextlib.aclosing(aiter_deltas(llm, [request_id])) as deltas:
            num_tokens = 0
            async for delta in deltas:
                num_tokens += len(delta.token_ids)
                chunk = self._chunk(delta, len(prompt_ids), num_tokens)
                if chunk is None:
                    continue
                if run_manager and delta.text:
                    await run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk

    def _chunk(self, delta: StreamDelta, num_prompt_tokens: int, num_tokens: int) -> ChatGenerationChunk | None:
        """A text chunk, or for the final delta the last chunk: its text plus usage and metadata, once."""
        if delta.error:
            raise RuntimeError(f"SpecDesk generation failed: {delta.error}")
        if not delta.finished:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text)) if delta.text else None
        m = delta.metrics
        usage = UsageMetadata(
            input_tokens=num_prompt_tokens,
            output_tokens=num_tokens,
            total_tokens=num_prompt_tokens + num_tokens,
            input_token_details={"cache_read": m.num_cached_tokens if m else 0},
        )
        reason = delta.finish_reason.value if delta.finish_reason else "stop"
        metadata: dict[str, Any] = {"model_name": self._model_name(), "finish_reason": reason}
        if m is not None:
            metadata["specdesk"] = {
                "num_cached_tokens": m.num_cached_tokens, "num_draft_tokens": m.num_draft_tokens,
                "num_accepted_tokens": m.num_accepted_tokens, "tokens_per_step": m.tokens_per_step,
                "ttft_s": m.ttft_s, "decode_tokens_per_s": m.decode_tokens_per_s,
            }  # fmt: skip
        message = AIMessageChunk(
            content=delta.text, usage_metadata=usage, response_metadata=metadata, chunk_position="last"
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": reason})


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """Role/content dicts for the chat template. Text only; consecutive turns of one role are merged,
    since many chat templates reject two user (or system) turns in a row."""
    out: list[dict[str, str]] = []
    for message in messages:
        kind = message.role if isinstance(message, ChatMessage) else message.type
        role = _ROLES.get(kind)
        if role is None:
            raise ValueError(f"{type(message).__name__} ({kind!r}) is not supported: SpecDesk chat is text only")
        content = message.content
        if isinstance(content, list) and any(
            not isinstance(b, str) and b.get("type") != "text" for b in content
        ):  # fmt: skip
            raise ValueError("only text content is supported")
        text = message.text
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out
