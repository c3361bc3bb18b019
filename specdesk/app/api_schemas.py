"""OpenAI wire format for app/api.py: request bodies, their translation to SamplingParams, response
payloads and OpenAI-shaped errors. Pure data: no routes, no engine calls.

Bodies are read under limits before anything is parsed: JSON only (a cross-site form cannot start a
generation), at most MAX_BODY_BYTES, nested at most MAX_JSON_DEPTH deep, valid Unicode; one call fans out
to at most MAX_CHOICES engine requests.

Unknown request fields are accepted and ignored (clients send many optional ones); fields we cannot
honour (echo, suffix, best_of) are refused with a 400 rather than silently dropped. Sampling follows
OpenAI (penalties, logit_bias, logprobs) plus vLLM's `repetition_penalty` and `min_p`; tools and
response_format are translated in app/api_tools.py, logprobs shaped in app/api_logprobs.py.
SpecDesk adds `top_k`, `ignore_eos`, `speculate` and `cache_salt` (as vLLM does) to requests and a
`specdesk` object to responses, which standard clients keep as an unknown extra field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from specdesk.engine.outputs import FinishReason, RequestMetrics
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.structured_output import StructuredOutput

COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens: OpenAI's (and vLLM's) default
# SamplingParams' messages start with the parameter's name (longer names first: "top_logprobs" reads as
# "logprobs" on the engine side).
_PARAM_NAMES = (
    "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "min_p", "logit_bias", "logprobs",
)  # fmt: skip

MAX_BODY_BYTES = 1 << 20  # a context window of text is far smaller; more is a mistake or an attack
MAX_JSON_DEPTH = 32  # messages -> parts -> text is 5 deep; JSON nested past Python's stack would be a 500
MAX_PROMPTS = 64  # prompts in one /v1/completions call
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n: engine requests one call may queue


class ApiError(Exception):
    """An error the client gets back as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


R = TypeVar("R", bound="_Request")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM spells them the same way)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    speculate: bool = True
    cache_salt: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


async def read_json_body(request: Request) -> object:
    """The request's JSON body, refused early: 415 unless `application/json`, 413 past MAX_BODY_BYTES
    (by Content-Length before a byte is read, else while streaming), 400 for bad JSON, JSON nested past
    MAX_JSON_DEPTH or strings that are not valid Unicode (lone surrogates)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "the request body must be JSON: send 'Content-Type: application/json'")
    too_large = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    _check_json_value(body)
    return body


def _check_json_value(value: object) -> None:
    # Iterative on purpose: the check must not itself recurse once per level.
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            pending.extend((k, depth) for k in item)
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "a string in the body is not valid Unicode (lone surrogate)") from None


def check_fan_out(num_prompts: int, n: int) -> None:
    """400 before tokenizing when one call would queue too many engine requests."""
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n")
    if num_prompts > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {num_prompts}", param="prompt")
    if num_prompts * n > MAX_CHOICES:
        raise ApiError(
            400, f"prompts x n is {num_prompts * n}; at most {MAX_CHOICES} completions per request", param="n"
        )


def parse_request(cls: type[R], body: object) -> R:
    """Validate a JSON body; pydantic's complaint becomes a 400 naming the first bad field."""
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"invalid request: {param}: {err['msg']}", param=param) from None


def refuse_unsupported(req: _Request) -> None:
    """400 for features this server does not implement, instead of silently ignoring them."""
    if isinstance(req, CompletionRequest):
        unsupported = [
            ("echo", req.echo), ("suffix", req.suffix is not None), ("best_of", req.best_of not in (None, 1)),
        ]  # fmt: skip
        for param, bad in unsupported:
            if bad:
                raise ApiError(400, f"'{param}' with this value is not supported by SpecDesk", param=param)


def sampling_params(
    req: _Request, max_tokens: int, choice: int = 0, structured: StructuredOutput | None = None
) -> SamplingParams:
    """SamplingParams for one choice. Defaults follow OpenAI (temperature 1, top_p 1); the engine's own
    validation is the single source of truth for ranges, and its message names the parameter."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    logprobs = _logprobs(req)
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            max_tokens=max_tokens,
            # n > 1 with a seed: distinct but reproducible choices.
            seed=None if req.seed is None else req.seed + choice,
            stop=tuple(stop),
            ignore_eos=req.ignore_eos,
            speculate=req.speculate,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            min_p=req.min_p or 0.0,
            logit_bias=tuple((req.logit_bias or {}).items()),  # type: ignore[arg-type]  # keys checked there
            logprobs=logprobs,
            structured_output=structured,
        )
    except ValueError as exc:
        message = str(exc)
        param = next((p for p in _PARAM_NAMES if message.startswith(p)), None)
        if param == "logprobs" and isinstance(req, ChatCompletionRequest):
            param, message = "top_logprobs", "top_" + message
        raise ApiError(400, message, param=param) from None


def _logprobs(req: _Request) -> int | None:
    """The engine's logprobs (top-k count) from chat's `logprobs` + `top_logprobs` or completions' int."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    assert isinstance(req, ChatCompletionRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """400 in OpenAI's words when the prompt, or the prompt plus the requested completion, cannot fit."""
    total = num_prompt_tokens + (max_tokens or 0)
    if num_prompt_tokens >= max_model_len or total > max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} "
            f"tokens ({num_prompt_tokens} in the {param}, {max_tokens or 0} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param=param,
            code="context_length_exceeded",
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def finish_reason(reason: FinishReason | None, has_tool_calls: bool = False) -> str:
    if reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def specdesk_extra(metrics: RequestMetrics | None) -> dict[str, Any]:
    """The extension object: what the engine knows beyond OpenAI's usage."""
    m = metrics or RequestMetrics()
    return {
        "num_cached_tokens": m.num_cached_tokens,
        "num_draft_tokens": m.num_draft_tokens,
        "num_accepted_tokens": m.num_accepted_tokens,
        "tokens_per_step": round(m.tokens_per_step, 4),
        "ttft_s": None if m.ttft_s is None else round(m.ttft_s, 6),
        "decode_tokens_per_s": round(m.decode_tokens_per_s, 3),
        "num_preemptions": m.num_preemptions,
    }


def sse(payload: dict[str, Any] | Literal["[DONE]"]) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
