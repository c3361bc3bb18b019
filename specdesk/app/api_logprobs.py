"""Token log-probabilities in OpenAI's wire shapes, from the engine's TokenLogprob records.

A token's text is what vLLM shows: `convert_ids_to_tokens` turned back into text by the tokenizer
(`convert_tokens_to_string`), so a byte-level "Ġhello" reads " hello"; `bytes` is that text's UTF-8.
A token that is only part of a character reads as U+FFFD, as in vLLM.
"""

from __future__ import annotations

from typing import Any

from specdesk.engine.outputs import TokenLogprob


class TokenTexts:
    """Token id -> display text, cached (the same ids recur across a reply's top-k lists)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            text = "" if token is None else str(self.tokenizer.convert_tokens_to_string([token]))
            self._cache[token_id] = text
        return text


def _logprob(value: float) -> float:
    # JSON has no -inf: a token the processing ruled out reads as OpenAI's floor.
    return max(value, -9999.0)


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of /v1/chat/completions: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = texts(token_id)
        return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of /v1/completions: parallel lists; `top_logprobs` maps token text to logprob
    for the top k, plus the emitted token (as vLLM does); `text_offset` counts characters of the completion
    from `text_offset` on (a stream passes the length already sent)."""
    tokens, offsets, tops = [], [], []
    for lp in logprobs:
        token = texts(lp.token_id)
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
        top: dict[str, float] = {}
        for t, v in [*lp.top, (lp.token_id, lp.logprob)]:
            top.setdefault(texts(t), _logprob(v))  # tokens of one text (partial UTF-8 "\ufffd"): the best
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
