"""Per-request sampling parameters, validated once at the API boundary."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature == 0 means greedy; a sampled request needs at least MIN_TEMPERATURE (see there why).
    top_k == 0 and top_p == 1.0 disable those filters. Every number must be finite; counts are ints, not bools.
    `seed` makes a sampled request reproducible on its own, whatever else is batched with it.
    `speculate=False` turns speculation off for this request only (side-by-side demos).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    speculate: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params stay hashable.
        object.__setattr__(self, "stop", _as_tuple("stop", (self.stop,) if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the offending parameter (the message starts with its name)."""
        t = _real("temperature", self.temperature)
        if t < 0 or 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}")
        _integer("top_k", self.top_k, minimum=0, meaning=" (0 disables it)")
        top_p = _real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        _integer("max_tokens", self.max_tokens, minimum=1)
        if self.seed is not None:
            _integer("seed", self.seed, minimum=0, meaning=" or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id, minimum=0)
        for name in ("ignore_eos", "skip_special_tokens", "speculate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")


# The sampler divides float32 logits by the temperature. A positive temperature that float32 rounds to 0
# or to a subnormal (1e-320, 1e-40) turns the scaled logits into inf and the probabilities into NaN. Any
# temperature from 1e-5 up keeps real logits (well under 1e30 in size) finite after the division, and below
# it sampling is greedy in all but name: a logit gap of 0.001 already weighs e^100 to 1. So the choice is 0
# (greedy) or >= 1e-5, nothing in between.
MIN_TEMPERATURE = 1e-5
# The largest finite float32: a larger temperature would become inf in the sampler.
_MAX_FLOAT32 = 3.4028234663852886e38


def _real(name: str, value: object) -> float:
    """A finite real number (not a bool) that stays finite in float32, where the sampler uses it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > _MAX_FLOAT32:
        raise ValueError(f"{name} must be a finite number of at most {_MAX_FLOAT32:.3g} (float32), got {value!r}")
    return float(value)


def _integer(name: str, value: object, minimum: int, meaning: str = "") -> int:
    """An int (not a bool: True is no token count) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{meaning}, got {value!r}")
    return value


def _as_tuple(name: str, values: object) -> tuple[object, ...]:
    if isinstance(values, str | bytes | dict) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list, got {values!r:.80}")
    return tuple(values)
