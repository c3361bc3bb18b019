"""Fit a conversation into the model's context window by dropping its oldest turns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

ChatMessage = dict[str, str]


class ContextOverflowError(ValueError):
    """Even the system prompt plus the last customer turn is longer than the context allows."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"the message is too long for the context: {num_tokens} tokens with the system prompt, "
            f"at most {max_tokens}; shorten it or start a new conversation"
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


def fit_to_context(
    messages: Sequence[Mapping[str, str]],
    count_tokens: Callable[[list[ChatMessage]], int],
    max_tokens: int,
) -> tuple[list[ChatMessage], int]:
    """Drop the oldest turns until ``count_tokens(kept) <= max_tokens``; return (kept, num_dropped).

    * Leading system messages are never dropped.
    * Whole turns go (a customer message with the replies after it), so what is kept always starts
      with a customer message and user/assistant pairs stay aligned for the chat template.
    * The last customer message, and anything after it, is always kept; if even that does not fit,
      ContextOverflowError says by how much.
    * ``num_dropped`` counts messages, not turns.

    ``count_tokens`` sees whole candidate lists (so it can apply the chat template) and is called
    O(log turns) times: the cut is found by bisection, since dropping more never adds tokens.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    all_messages = [dict(m) for m in messages]
    num_system = 0
    while num_system < len(all_messages) and all_messages[num_system]["role"] == "system":
        num_system += 1
    system, turns = all_messages[:num_system], all_messages[num_system:]

    def kept(cut: int) -> list[ChatMessage]:
        return system + turns[cut:]

    # Cut points: the start of each turn up to the last customer message. Index 0 keeps everything
    # (and covers a reply that precedes the first customer message, such as a greeting macro).
    user_indices = [i for i, m in enumerate(turns) if m["role"] == "user"]
    last_user = user_indices[-1] if user_indices else 0
    cuts = sorted({0, *(i for i in user_indices if i <= last_user)})

    if count_tokens(kept(0)) <= max_tokens:
        return kept(0), 0
    num_tokens = count_tokens(kept(cuts[-1]))
    if num_tokens > max_tokens:
        raise ContextOverflowError(num_tokens, max_tokens)
    # Invariant: cuts[lo] does not fit, cuts[hi] fits.
    lo, hi = 0, len(cuts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(kept(cuts[mid])) <= max_tokens:
            hi = mid
        else:
            lo = mid
    return kept(cuts[hi]), cuts[hi]
