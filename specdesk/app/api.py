"""OpenAI-compatible `/v1` routes on the console's own FastAPI app, served by the same in-process engine.

    mount_openai_api(demo_app, llm, model_name="specdesk", api_keys=["sk-..."])

    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions, /v1/completions    (JSON, or SSE with "stream": true)

Every request is checked (key, body, model, parameters, prompt length) before anything is queued, so bad
input gets an HTTP 4xx in OpenAI's error shape and never touches the engine (invariant 7). Each API key is
its own prefix-cache tenant (app/auth.py): a caller never gets a cache hit on another key's prompt. Once queued,
a request is tied to its HTTP connection: a client that goes away aborts it and its pages are freed
(invariant 4). Wire details live in app/api_schemas.py; tools, tool calls and response_format in
app/api_tools.py (the model-facing protocol in engine/tool_calls.py); logprobs in app/api_logprobs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from specdesk.app.api_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from specdesk.app.api_schemas import (
    COMPLETION_MAX_TOKENS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    check_context_length,
    check_fan_out,
    finish_reason,
    new_id,
    now_s,
    parse_request,
    read_json_body,
    refuse_unsupported,
    sampling_params,
    specdesk_extra,
    sse,
    usage,
)
from specdesk.app.api_tools import ChatPlan, chat_plan, delta_tool_call, message_tool_calls
from specdesk.app.auth import ApiKeys, tenant_cache_salt
from specdesk.engine.async_stream import aiter_deltas
from specdesk.engine.outputs import RequestMetrics, StreamDelta, TokenLogprob
from specdesk.engine.tool_calls import ToolCallParser, ToolEvent

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM, Prompt

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25


def mount_openai_api(app: FastAPI, llm: LLM, model_name: str, api_keys: list[str] | None = None) -> None:
    """Add the `/v1` routes to `app` (a plain FastAPI app or Gradio's), serving `llm` as `model_name`.

    With `api_keys` (read once, by the settings), every `/v1` call needs `Authorization: Bearer <key>`;
    without any, the API is open and all its callers are one cache tenant.
    """
    server = _OpenAIServer(llm, model_name, ApiKeys(api_keys or []))
    router = APIRouter(prefix="/v1", tags=["openai"])
    router.add_api_route("/models", server.list_models, methods=["GET"])
    router.add_api_route("/models/{model_id:path}", server.get_model, methods=["GET"])
    router.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    router.add_api_route("/completions", server.completions, methods=["POST"])
    app.include_router(router)


# Grammar compiles running at once (each on a thread; llguidance releases the GIL): about a CPU's worth.
GRAMMAR_COMPILE_THREADS = 2


@dataclass
class _Choice:
    """One engine request behind one response choice."""

    index: int
    prompt_index: int
    request_id: str
    num_prompt_tokens: int
    parser: ToolCallParser | None = None  # chat with tools: reads calls out of the reply
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_chars: int = 0  # completion characters streamed so far (text_offset of the next logprobs)
    reading: bool = False  # a response body reads its deltas (closing it aborts the request)

    def events(self, delta: StreamDelta) -> list[ToolEvent]:
        """The delta's text as content and tool-call events (all content without tools)."""
        if self.parser is None:
            return [ToolEvent("content", delta.text)] if delta.text else []
        return self.parser.feed(delta.text) + (self.parser.finish() if delta.finished else [])

    def finish(self, reason: str | None) -> str:
        has_calls = self.parser is not None and bool(self.parser.calls)
        return "length" if reason == "length" else ("tool_calls" if has_calls else "stop")


class _OpenAIServer:
    def __init__(self, llm: LLM, model_name: str, api_keys: ApiKeys) -> None:
        self.llm = llm
        self.model_name = model_name
        self.api_keys = api_keys
        self.created = now_s()
        self.token_texts = TokenTexts(llm.tokenizer)
        self._compiles: anyio.CapacityLimiter | None = None  # made in the server's event loop, on first use

    # ---- routes -----------------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return await self._guard(request, lambda tenant: self._models())

    async def get_model(self, request: Request, model_id: str) -> Response:
        async def one(tenant: str) -> Response:
            self._check_model(model_id, status=404)
            return JSONResponse(self._model_card())

        return await self._guard(request, one)

    async def chat_completions(self, request: Request) -> Response:
        return await self._guard(request, lambda tenant: self._completion(request, tenant, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self._guard(request, lambda tenant: self._completion(request, tenant, chat=False))

    # ---- plumbing ---------------------------------------------------------------------------------
    async def _guard(self, request: Request, handler: Any) -> Response:
        """Authorize, run the handler with the caller's cache tenant, and turn every failure into OpenAI's
        error shape."""
        try:
            tenant = self.api_keys.tenant(request.headers.get("authorization"))
            if tenant is None:
                raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            response: Response = await handler(tenant)
            return response
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except Exception as exc:  # a bug must still answer in the shape clients parse
            log.exception("unhandled error in %s", request.url.path)
            err = ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error")
            return JSONResponse(err.body(), status_code=500)

    def _check_model(self, model: str, status: int = 400) -> None:
        if model not in (self.model_name, self.llm.model_name):
            raise ApiError(
                status, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model", code="model_not_found",
            )  # fmt: skip

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "specdesk",
            "root": self.llm.model_name, "max_model_len": self.llm.max_model_len,
        }  # fmt: skip

    async def _models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _completion(self, request: Request, tenant: str, chat: bool) -> Response:
        body = await read_json_body(request)
        req: ChatCompletionRequest | CompletionRequest
        req = parse_request(ChatCompletionRequest, body) if chat else parse_request(CompletionRequest, body)
        self._check_model(req.model)
        refuse_unsupported(req)
        choices = await self._submit(req, tenant_cache_salt(tenant, req.cache_salt))
        if req.stream:
            return StreamingResponse(
                self._stream(req, choices, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                # Runs even when the client left before the first byte, when the body never started.
                background=BackgroundTask(self._release, choices),
            )
        collecting = asyncio.ensure_future(self._collect(choices))
        while not collecting.done():
            await asyncio.wait({collecting}, timeout=_DISCONNECT_POLL_S)
            if not collecting.done() and await request.is_disconnected():
                collecting.cancel()  # closes the delta stream: aborts the requests, frees their pages
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
                return Response(status_code=499)
        collecting.result()
        return JSONResponse(self._response(req, choices, chat))

    async def _submit(self, req: ChatCompletionRequest | CompletionRequest, cache_salt: str) -> list[_Choice]:
        """Tokenize, check lengths and queue every choice; all or nothing."""
        requested = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None
        requested = requested if requested is not None else req.max_tokens
        if requested is None and isinstance(req, CompletionRequest):
            requested = COMPLETION_MAX_TOKENS  # OpenAI's legacy default; chat's is the rest of the context
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        sampling_params(req, 1 if requested is None else requested)  # reject bad parameters before tokenizing
        prompts: list[Prompt]
        plan: ChatPlan | None = None
        if isinstance(req, ChatCompletionRequest):
            plan = chat_plan(req)
            prompts, param = [plan.messages], "messages"
        else:
            prompts, param = _completion_prompts(req.prompt), "prompt"
        structured = None if plan is None else plan.structured
        check_fan_out(len(prompts), req.n)
        if structured is not None:  # compiling a big schema takes a while: off the event loop (cached for submit)
            try:
                params = sampling_params(req, 1, structured=structured)
                await anyio.to_thread.run_sync(self.llm.prepare_grammar, params, limiter=self._compile_threads())
            except ValueError as exc:
                raise ApiError(400, str(exc), param=_param_of(str(exc), req, param)) from None
        max_len = self.llm.max_model_len
        choices: list[_Choice] = []
        try:
            for p, prompt in enumerate(prompts):
                try:
                    ids = await anyio.to_thread.run_sync(self.llm.encode, prompt)
                except ValueError as exc:
                    raise ApiError(400, str(exc), param=param) from None
                check_context_length(len(ids), requested, max_len, param)
                for j in range(req.n):
                    params = sampling_params(req, requested or max_len - len(ids), choice=j, structured=structured)
                    try:
                        rid = self.llm.submit(ids, params, cache_salt=cache_salt)
                    except ValueError as exc:
                        raise ApiError(400, str(exc), param=_param_of(str(exc), req, param)) from None
                    except RuntimeError as exc:  # engine shut down
                        raise ApiError(503, str(exc), type_="server_error") from None
                    parser = None if plan is None else plan.parser()
                    choices.append(_Choice(len(choices), p, rid, len(ids), parser))
        except BaseException:
            self._release(choices)
            raise
        return choices

    def _compile_threads(self) -> anyio.CapacityLimiter:
        # Grammar compiles get threads of their own: a flood of big schemas (seconds each) held every thread of
        # the shared pool (40), and a plain chat's template encode waited behind them (27 s for 45 at once).
        if self._compiles is None:
            self._compiles = anyio.CapacityLimiter(GRAMMAR_COMPILE_THREADS)
        return self._compiles

    def _release(self, choices: list[_Choice]) -> None:
        # Request ids are never reused, so aborting one that already finished is a harmless no-op. One whose
        # deltas no body ever read (a refused batch, a client gone before the first byte) is cancelled: its
        # stream would otherwise stay in the engine client for good.
        for c in choices:
            (self.llm.abort if c.reading else self.llm.cancel)(c.request_id)

    async def _collect(self, choices: list[_Choice]) -> None:
        by_id = {c.request_id: c for c in choices}
        async with contextlib.aclosing(aiter_deltas(self.llm, list(by_id))) as deltas:
            async for delta in deltas:
                choice = by_id[delta.request_id]
                if delta.error and delta.error.startswith("grammar: "):  # the request's own spec, past a limit
                    cause = delta.error.removeprefix("grammar: ")
                    raise ApiError(400, f"the structured output failed while generating: {cause}")
                if delta.error:
                    raise ApiError(500, f"generation failed: {delta.error}", type_="server_error")
                choice.text.append(delta.text)
                choice.num_tokens += len(delta.token_ids)
                choice.logprobs += delta.logprobs or []
                if delta.finished:
                    choice.finish_reason = finish_reason(delta.finish_reason)
                    choice.metrics = delta.metrics

    def _response(self, req: ChatCompletionRequest | CompletionRequest, choices: list[_Choice], chat: bool) -> dict:
        out = []
        for c in choices:
            text = "".join(c.text)
            body: dict[str, Any] = {"text": text}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if c.parser is not None:
                    events = c.parser.feed(text) + c.parser.finish()
                    content = "".join(e.text for e in events if e.kind == "content")
                    if c.parser.calls:
                        message = {"role": "assistant", "content": content.strip() or None}
                        message["tool_calls"] = message_tool_calls(c.parser.calls)
                body = {"message": message}
            out.append(
                {
                    "index": c.index,
                    **body,
                    "logprobs": self._logprobs(req, c.logprobs, chat),
                    "finish_reason": c.finish(c.finish_reason),
                    "specdesk": specdesk_extra(c.metrics),
                }
            )
        return {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": now_s(),
            "model": req.model,
            "system_fingerprint": None,
            "choices": out,
            "usage": _usage(choices),
        }

    async def _stream(
        self, req: ChatCompletionRequest | CompletionRequest, choices: list[_Choice], chat: bool
    ) -> AsyncIterator[str]:
        """SSE chunks: (chat) a role chunk per choice, content chunks, one finish chunk per choice carrying
        `finish_reason` and the `specdesk` extras, then with include_usage a `choices: []` usage chunk, then
        `data: [DONE]`."""
        base = {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": now_s(), "model": req.model, "system_fingerprint": None,
            **({"usage": None} if req.include_usage else {}),
        }  # fmt: skip

        def chunk(c: _Choice, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"delta": delta} if chat else {"text": delta.get("content", "")}
            lps = self._logprobs(req, c.logprobs, chat, c.num_chars) if c.logprobs else None
            if c.logprobs and not chat:
                c.num_chars += sum(len(t) for t in lps["tokens"]) if lps else 0
            c.logprobs = []
            payload = {"index": c.index, **body, "logprobs": lps, "finish_reason": finish, **extra}
            return sse({**base, "choices": [payload]})

        for c in choices:
            c.reading = True
        if chat:
            for c in choices:
                yield chunk(c, {"role": "assistant", "content": ""})
        by_id = {c.request_id: c for c in choices}
        async with contextlib.aclosing(aiter_deltas(self.llm, list(by_id))) as deltas:
            async for delta in deltas:
                c = by_id[delta.request_id]
                if delta.error:
                    yield sse(ApiError(500, f"generation failed: {delta.error}", type_="server_error").body())
                    return  # closing the stream aborts the other choices
                c.num_tokens += len(delta.token_ids)
                c.logprobs += delta.logprobs or []  # ride on the next chunk this choice sends
                for event in c.events(delta):
                    if event.kind == "content":
                        yield chunk(c, {"content": event.text})
                    else:
                        yield chunk(c, {"tool_calls": [delta_tool_call(event)]})
                if delta.finished:
                    c.metrics = delta.metrics
                    reason = c.finish(finish_reason(delta.finish_reason))
                    yield chunk(c, {} if chat else {"content": ""}, reason, specdesk=specdesk_extra(c.metrics))
        if req.include_usage:
            yield sse({**base, "choices": [], "usage": _usage(choices)})
        yield sse("[DONE]")

    def _logprobs(
        self, req: ChatCompletionRequest | CompletionRequest, logprobs: list[TokenLogprob], chat: bool, offset: int = 0
    ) -> dict[str, Any] | None:
        if req.logprobs is None or req.logprobs is False:
            return None
        if chat:
            return chat_logprobs(self.token_texts, logprobs)
        return completion_logprobs(self.token_texts, logprobs, offset)


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    # n choices of one prompt share it: its tokens count once; cached = what every choice reused.
    prompts: dict[int, list[_Choice]] = {}
    for c in choices:
        prompts.setdefault(c.prompt_index, []).append(c)
    num_prompt = sum(cs[0].num_prompt_tokens for cs in prompts.values())
    num_cached = sum(min((c.metrics.num_cached_tokens if c.metrics else 0) for c in cs) for cs in prompts.values())
    return usage(num_prompt, sum(c.num_tokens for c in choices), num_cached)


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _param_of(message: str, req: Any, default: str) -> str:
    """The request field a refused submit was about: the engine's messages start with what they refuse."""
    if message.startswith("structured output"):
        return "tools" if getattr(req, "tools", None) else "response_format"
    if message.startswith("logit_bias"):
        return "logit_bias"
    return default
