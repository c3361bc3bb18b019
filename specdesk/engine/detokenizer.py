"""Incremental detokenization: token ids in, text deltas out, stop strings cut.

Contract (tests hold us to it): the concatenation of every delta that `add()` and `flush()` return equals
`tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)`, cut right before the stop
string that ends first in that text (on a tie, the one that starts first). No delta ever holds part of a stop
string, or a U+FFFD that the full decode would not have in that place. The prompt is not decode context: the
text is the output's own decode, as with HF `generate` followed by decoding the new tokens (so a sentencepiece
"▁Hi" as first token reads "Hi").

How (vLLM's prefix_offset/read_offset scheme): text up to `read_offset` is settled. Each step decodes only the
window ids[prefix_offset:], where ids[prefix_offset:read_offset] is the run that produced the last settled
text, and emits what the window adds past decode(ids[prefix_offset:read_offset]). That context run decodes to
non-empty raw text, so a sentencepiece decoder strips the leading "▁" space of the window in both decodes
alike and the subtraction keeps the real space. A window is settled only when its text does not end in
U+FFFD (a UTF-8 character cut mid-way) and, for byte-fallback vocabularies, its last id is not a byte token:
ByteFallback decodes a whole run of <0xNN> tokens at once and turns all of it into U+FFFD if any byte of it
is bad, so a run that reads "€" now may read four U+FFFD after one more byte.
"""

from __future__ import annotations

from typing import Any

from specdesk.engine.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into streamed text and watches for its stop strings.

    `tokenizer` is a transformers tokenizer. `prompt_token_ids` is accepted for the engine's convenience but
    is not decode context (see the module docstring). Engine use: call `add()` with each step's accepted ids
    and stream the delta; once `stopped_by` is set, keep `num_tokens` output ids and finish with STOP; when
    the request ends otherwise (EOS, length, abort), stream `flush()`.

    Attributes:
        text: all text released so far (the concatenation of the deltas).
        stopped_by: the stop string that ended the text, or None.
        num_tokens: output tokens consumed so far. After a stop string it stops growing: the engine keeps
            exactly this many output tokens, the last one being the token that completed the stop string.
        num_tokens_before_stop: None until a stop string hits; then how many ids of the `add()` call that
            hit it were consumed, up to and including the one that completed the stop string. The engine
            drops the rest of that call's ids (e.g. the tail of an accepted speculative run), so speculative
            and plain decoding keep the same tokens.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self.stopped_by: str | None = None
        self.num_tokens = 0
        self.num_tokens_before_stop: int | None = None
        # Decode skips exactly the added tokens marked special (not `all_special_ids`, which can miss some).
        # Dropping them here keeps "is the last id a byte token" true to what the decoder sees.
        self._skip_ids: frozenset[int] = (
            frozenset(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
            if params.skip_special_tokens
            else frozenset()
        )
        self._byte_ids = _byte_fallback_ids(tokenizer)
        self._stops = params.stop
        self._ids: list[int] = []  # output ids the decoder sees (skipped specials removed)
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text: str | None = ""  # decode(ids[prefix_offset:read_offset]); None = recompute
        self._pending = ""  # settled text not yet released: a possible start of a stop string

    def add(self, token_ids: list[int]) -> str:
        """Consume newly generated ids (one, or a run of accepted speculative ids); return the new text.

        Sets `stopped_by`, `num_tokens_before_stop` when a stop string completes inside `token_ids`.
        """
        assert self.stopped_by is None, f"add() after stop string {self.stopped_by!r}"
        if not self._stops:
            # No stop strings: one window decode for the whole run is enough.
            self.num_tokens += len(token_ids)
            self._ids.extend(t for t in token_ids if t not in self._skip_ids)
            self._pending += self._decode_window(final=False)
            return self._release()
        # With stop strings, go token by token so the stop is pinned to the id that completed it: the result
        # must not depend on how the engine chunked the ids.
        deltas = []
        for i, token_id in enumerate(token_ids):
            self.num_tokens += 1
            if token_id in self._skip_ids:
                continue
            self._ids.append(token_id)
            self._pending += self._decode_window(final=False)
            deltas.append(self._release())
            if self.stopped_by is not None:
                self.num_tokens_before_stop = i + 1
                break
        return "".join(deltas)

    def flush(self) -> str:
        """Release all held-back text; call once when the request ends other than by a stop string.

        Forces out a trailing U+FFFD or byte run and any text held as a possible stop-string start. The
        forced text can still complete a stop string (then `stopped_by` is set and the text cut); all ids
        stay consumed in that case.
        """
        if self.stopped_by is not None:
            return ""
        self._pending += self._decode_window(final=True)
        return self._release(final=True)

    def _decode_window(self, final: bool) -> str:
        """Return the settled text that ids past `read_offset` add, and advance the offsets over them."""
        ids = self._ids
        if self._read_offset == len(ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(ids[self._prefix_offset :])
        if not final and (window_text.endswith(_REPLACEMENT_CHAR) or ids[-1] in self._byte_ids):
            return ""  # an unfinished character or byte run: wait for more ids
        if len(window_text) <= len(self._prefix_text):
            return ""  # the new ids decode to nothing yet; keep them in the window
        assert window_text.startswith(self._prefix_text), (
            f"decode is not prefix-stable: {self._prefix_text!r} -> {window_text!r}"
        )
        delta = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self._prefix_text = None
        return delta

    def _decode(self, ids: list[int]) -> str:
        # No clean-up pass: it rewrites " ." across window edges, so windows would not add up to the whole.
        return str(
            self.tokenizer.decode(
                ids, skip_special_tokens=self.params.skip_special_tokens, clean_up_tokenization_spaces=False
            )
        )

    def _release(self, final: bool = False) -> str:
        """Move pending text to `text`, cutting at a stop string and holding back a possible stop start.

        Searching `_pending` alone is enough: released text never ends in a stop-string prefix (that suffix
        is exactly what stays pending), so no stop string can begin inside released text.
        """
        pending = self._pending
        if self._stops:
            # The stop string that ends first wins (that is what a token-by-token stream sees first); on a tie
            # the one that starts first, so no stop string is left in the text.
            hits = ((i + len(s), i, s) for s in self._stops if (i := pending.find(s)) >= 0)
            hit = min(hits, default=None)
            if hit is not None:
                _, cut, self.stopped_by = hit
                delta, self._pending = pending[:cut], ""
                self.text += delta
                return delta
            if not final:
                held = _longest_stop_prefix_suffix(pending, self._stops)
                delta, self._pending = pending[: len(pending) - held], pending[len(pending) - held :]
                self.text += delta
                return delta
        self._pending = ""
        self.text += pending
        return pending


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for length in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        suffix = text[-length:]
        if any(s.startswith(suffix) for s in stops):
            return length
    return 0


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of sentencepiece byte-fallback tokens "<0x00>".."<0xFF>"; empty for vocabularies without them."""
    unk_id = tokenizer.unk_token_id

    def real_id(token: str) -> int | None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == unk_id or tokenizer.convert_ids_to_tokens(token_id) != token:
            return None
        return int(token_id)

    if real_id("<0x41>") is None:  # cheap probe: byte-level BPE and word-piece vocabularies stop here
        return frozenset()
    return frozenset(i for b in range(256) if (i := real_id(f"<0x{b:02X}>")) is not None)
