"""`ChatSpecDesk`: a LangChain chat model over the in-process engine (no server, no network).

    from specdesk.langchain import ChatSpecDesk
    chat = ChatSpecDesk(max_tokens=128)                    # built-in default model, loaded on first use
    chat.invoke("Where is my parcel?")
    for chunk in chat.stream([("system", "Be brief."), ("human", "Hi")]): print(chunk.content, end="")
    chat = ChatSpecDesk(llm=service.llm)                   # share the console's engine

    chat.bind_tools([lookup_order]).invoke("Where is order 48213?").tool_calls
    chat.with_structured_output(Ticket).invoke("My lamp arrived broken")   # a pydantic class back
    chat.invoke("Hi", logprobs=True, top_logprobs=3).response_metadata["logprobs"]

Tool calls and structured output are grammar-constrained (the engine's structured output): `bind_tools`
takes LangChain tools, pydantic classes, functions or OpenAI dicts and `tool_choice` ("auto", "none",
"any"/"required", a name); `with_structured_output` uses a JSON-schema grammar (method="json_schema",
the default), a forced function call ("function_calling") or any JSON object ("json_mode"). Calls come back
as AIMessage.tool_calls, streamed as tool_call_chunks; logprobs as langchain-openai shapes them. Sampling
covers OpenAI's penalties and logit_bias plus repetition_penalty and min_p. Content is text only.
Concurrent calls (`batch`, `abatch`, several threads or tasks) are batched together by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, model_validator

from specdesk import langchain_tools
from specdesk.app.api_logprobs import TokenTexts, chat_logprobs
from specdesk.engine.async_stream import aiter_deltas
from specdesk.engine.outputs import StreamDelta
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.structured_output import StructuredOutput
from specdesk.engine.tool_calls import ToolCallParser
from specdesk.langchain_tools import StructuredMethod

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

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
    repetition_penalty: float = 1.0
    """transformers' definition over prompt and reply (1.0: off)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    """OpenAI's: token id -> bias in [-100, 100]."""
    logprobs: bool | None = None
    """Return each token's log-probability in response_metadata["logprobs"] (langchain-openai's shape)."""
    top_logprobs: int | None = None
    """With logprobs: also the k most likely tokens at each position (0-20)."""
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
            "speculate": self.speculate, "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
            "min_p": self.min_p, "logit_bias": self.logit_bias, "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
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

    def _sampling_params(
        self, stop: list[str] | None, kwargs: dict[str, Any], structured: StructuredOutput | None = None
    ) -> SamplingParams:
        model = kwargs.get("model")
        if model is not None and model not in (self.model, self._model_name()):
            raise ValueError(f"this ChatSpecDesk serves {self._model_name()!r}, not {model!r}")
        p = {**self._default_params(), **{k: v for k, v in kwargs.items() if k in self._default_params()}}
        stops = [*(self.stop or []), *(stop or [])]
        if p["top_logprobs"] is not None and not p["logprobs"]:
            raise ValueError("top_logprobs needs logprobs=True")
        return SamplingParams(
            temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"], max_tokens=p["max_tokens"],
            seed=p["seed"], stop=tuple(dict.fromkeys(stops)), ignore_eos=p["ignore_eos"],
            speculate=p["speculate"], repetition_penalty=p["repetition_penalty"],
            frequency_penalty=p["frequency_penalty"], presence_penalty=p["presence_penalty"], min_p=p["min_p"],
            logit_bias=tuple((p["logit_bias"] or {}).items()), structured_output=structured,
            logprobs=(p["top_logprobs"] or 0) if p["logprobs"] else None,
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
        plan = langchain_tools.plan(messages, kwargs)
        params = self._sampling_params(stop, kwargs, plan.structured)
        llm = self._engine()
        prompt_ids = llm.encode(plan.messages)
        deltas = cast(Generator[StreamDelta, None, None], llm.deltas(llm.submit(prompt_ids, params)))
        reply = _Reply(self, llm, plan.parser(), len(prompt_ids))
        with contextlib.closing(deltas):  # the caller stopping early aborts the request (pages freed)
            for delta in deltas:
                for chunk in reply.chunks(delta):
                    if run_manager and chunk.text:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
        plan = langchain_tools.plan(messages, kwargs)
        params = self._sampling_params(stop, kwargs, plan.structured)
        # Loading the engine and tokenizing are blocking work: keep them off the event loop.
        llm = await asyncio.to_thread(self._engine)
        prompt_ids = await asyncio.to_thread(llm.encode, plan.messages)
        request_id = llm.submit(prompt_ids, params)
        reply = _Reply(self, llm, plan.parser(), len(prompt_ids))
        async with contextlib.aclosing(aiter_deltas(llm, [request_id])) as deltas:
            async for delta in deltas:
                for chunk in reply.chunks(delta):
                    if run_manager and chunk.text:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    # ---- tools and structured output -----------------------------------------------------------
    def bind_tools(
        self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], *,
        tool_choice: dict[str, Any] | str | bool | None = None, parallel_tool_calls: bool | None = None,
        strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:  # fmt: skip
        """Offer `tools` (converted with langchain_core's convert_to_openai_tool) on every call. tool_choice:
        "auto" (default), "none", "any"/"required"/True (must call one), or a tool's name (must call it)."""
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        if tool_choice is not None:
            kwargs["tool_choice"] = langchain_tools.tool_choice_kwarg(tool_choice)
        return super().bind(tools=langchain_tools.openai_tools(tools, strict), **kwargs)

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False,
        method: StructuredMethod = "json_schema", strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:  # fmt: skip
        """Replies parsed into `schema` (a pydantic class, a TypedDict or a JSON schema dict), the output
        constrained by a grammar so it always parses: method "json_schema" (the schema itself), "function_calling"
        (a forced call of a function taking it) or "json_mode" (any JSON object). include_raw: a dict with the
        raw message, the parsed value and any parsing_error, as langchain-openai returns."""
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        return langchain_tools.structured_runnable(self.bind, schema, method, include_raw, strict)


class _Reply:
    """One call's deltas as message chunks: text, tool_call_chunks, logprobs, and one last chunk with usage."""

    def __init__(self, model: ChatSpecDesk, llm: LLM, parser: ToolCallParser | None, num_prompt_tokens: int) -> None:
        self.model, self.llm, self.parser = model, llm, parser
        self.num_prompt_tokens, self.num_tokens = num_prompt_tokens, 0

    def chunks(self, delta: StreamDelta) -> list[ChatGenerationChunk]:
        if delta.error:
            raise RuntimeError(f"SpecDesk generation failed: {delta.error}")
        self.num_tokens += len(delta.token_ids)
        if self.parser is None:
            messages = [AIMessageChunk(content=delta.text)] if delta.text else []
        else:
            events = self.parser.feed(delta.text) + (self.parser.finish() if delta.finished else [])
            messages = [langchain_tools.event_chunk(e) for e in events]
        if delta.logprobs:
            lps = chat_logprobs(_token_texts(self.llm), delta.logprobs)
            if not messages:
                messages = [AIMessageChunk(content="")]
            first = messages[0]
            messages[0] = first.model_copy(update={"response_metadata": {"logprobs": {"content": lps["content"]}}})
        if delta.finished:
            messages.append(self._last(delta))
        return [ChatGenerationChunk(message=m) for m in messages]

    def _last(self, delta: StreamDelta) -> AIMessageChunk:
        """Usage and metadata, once, on a final empty chunk."""
        m = delta.metrics
        usage = UsageMetadata(
            input_tokens=self.num_prompt_tokens,
            output_tokens=self.num_tokens,
            total_tokens=self.num_prompt_tokens + self.num_tokens,
            input_token_details={"cache_read": m.num_cached_tokens if m else 0},
        )
        reason = delta.finish_reason.value if delta.finish_reason else "stop"
        if reason == "stop" and self.parser is not None and self.parser.calls:
            reason = "tool_calls"
        metadata: dict[str, Any] = {"model_name": self.model._model_name(), "finish_reason": reason}
        if m is not None:
            metadata["specdesk"] = {
                "num_cached_tokens": m.num_cached_tokens, "num_draft_tokens": m.num_draft_tokens,
                "num_accepted_tokens": m.num_accepted_tokens, "tokens_per_step": m.tokens_per_step,
                "ttft_s": m.ttft_s, "decode_tokens_per_s": m.decode_tokens_per_s,
            }  # fmt: skip
        return AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata, chunk_position="last")


_TEXTS: weakref.WeakKeyDictionary[LLM, TokenTexts] = weakref.WeakKeyDictionary()


def _token_texts(llm: LLM) -> TokenTexts:
    # One cache of token texts per engine (its tokenizer).
    texts = _TEXTS.get(llm)
    if texts is None:
        texts = _TEXTS[llm] = TokenTexts(llm.tokenizer)
    return texts


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """Role/content dicts for the chat template: text, earlier tool calls and tool results rendered in the
    tool-call protocol (engine/tool_calls.py); consecutive turns of one role are merged."""
    return langchain_tools.plan(messages, {}).messages
