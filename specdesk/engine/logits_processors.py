"""Per-position logit processing before sampling: logit bias, penalties and grammar masks.

Every row of a pass decides one position. Plain rows decide the position after the sequence's verified
tokens; a draft tree's row r decides the position after its path (the verified tokens, then the draft tokens
from the root down to r). Everything here is a function of exactly those tokens, so a row's distribution is
the one plain decoding would use at that position whatever the tree around it: speculation stays lossless.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class RowConstraint(Protocol):
    """A request's grammar (engine/grammar/): which tokens it allows after each of some draft paths."""

    def allowed_rows(self, paths: list[list[int]], vocab_size: int) -> Tensor:
        """bool [len(paths), vocab_size]: row i allows token t iff the grammar, advanced from its current
        state (after the verified tokens) over paths[i], accepts t next. The state itself is unchanged."""
        ...
