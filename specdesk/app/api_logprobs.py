"""Token log-probabilities in OpenAI's wire shapes, from the engine's TokenLogprob records.

A token's text is what vLLM shows: `convert_ids_to_tokens` turned back into text by the tokenizer
(`convert_tokens_to_string`), so a byte-level "Ġhello" reads " hello"; `bytes` is that text's UTF-8.
A token that is only part of a character reads as U+FFFD, as in vLLM.
"""

from __future__ import annotations

import json
import re
from typing import Any

from specdesk.engine.outputs import TokenLogprob


class TokenTexts:
    """Token id -> display text and raw bytes, cached (the same ids recur across a reply's top-k lists).

    `bytes` are the token's own bytes, not its display text's: a token holding part of an emoji or a CJK
    character shows as U+FFFD, and its bytes are what lets a client put the character back together
    (OpenAI's reason for the field). Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) spell each byte as
    one character of a fixed table; SentencePiece ones write a lone byte as <0xNN>."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._byte_level = _is_byte_level(tokenizer)

    def bytes_of(self, token_id: int) -> list[int]:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str):
            lone = _LONE_BYTE.fullmatch(token)
            if lone:
                return [int(lone.group(1), 16)]
            if self._byte_level and all(c in _BYTE_OF_CHAR for c in token):
                return [_BYTE_OF_CHAR[c] for c in token]
            if not self._byte_level:
                return list(token.replace("\u2581", " ").encode("utf-8"))  # SentencePiece's word boundary
        return list(self(token_id).encode("utf-8"))

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
        return {"token": texts(token_id), "logprob": _logprob(logprob), "bytes": texts.bytes_of(token_id)}

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


_LONE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character that spells each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = _byte_table()


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds
