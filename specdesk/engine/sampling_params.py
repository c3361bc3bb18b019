"""Per-request sampling parameters, validated once at the API boundary."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from specdesk.engine.structured_output import StructuredOutput


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature == 0 means greedy; a sampled request needs at least MIN_TEMPERATURE (see there why).
    top_k == 0 and top_p == 1.0 disable those filters. Every number must be finite; counts are ints, not bools.
    `seed` makes a sampled request reproducible on its own, whatever else is batched with it.
    `speculate=False` turns speculation off for this request only (side-by-side demos).

    Logit processing (engine/logits_processors.py), in this order, each counted over the tokens before the
    position being decided (speculated positions included), so speculation never changes the outcome:
      logit_bias          {token id: bias in [-100, 100]} added to the logits (OpenAI's)
      repetition_penalty  transformers' definition over prompt + output: a seen token's logit z becomes
                          z / r if z > 0 else z * r (1.0: off; > 1 discourages repeats)
      frequency_penalty,  OpenAI's over the output only: z -= frequency_penalty * count(token)
      presence_penalty                                      + presence_penalty * (count(token) > 0)
      min_p               after temperature/top-k/top-p, drop tokens with p < min_p * max p (0.0: off)
    logprobs: None (off) or k in [0, 20]: each emitted token's log-probability under the model's own
      distribution (log_softmax of the raw logits, before any processing: vLLM's default) plus the top k.
    structured_output: constrain the output to a JSON schema, any JSON object, a regex or an EBNF grammar.
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
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    structured_output: StructuredOutput | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params stay hashable.
        object.__setattr__(self, "stop", _as_tuple("stop", (self.stop,) if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when the logits need per-position processing before sampling (logit_processors.py)."""
        return (
            self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )  # fmt: skip

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
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r:.80}")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings are at most {MAX_STOP_LENGTH} characters each, got {len(s)}")
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id, minimum=0)
        r = _real("repetition_penalty", self.repetition_penalty)
        if not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], got {r!r}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= _real(name, getattr(self, name)) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 <= _real("min_p", self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for token_id, bias in self.logit_bias:
            _integer("logit_bias token ids", token_id, minimum=0)
            if not -100.0 <= _real("logit_bias values", bias) <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, minimum=0, meaning=" or None")
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise ValueError(f"structured_output must be a StructuredOutput, got {self.structured_output!r:.80}")
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
# Every stop string is checked against the text after every token, on the engine's thread: a request with
# thousands of them would slow every other request's steps. OpenAI takes 4; this leaves room for more.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000
# transformers accepts any positive penalty; past 10 a seen token's logit is all but erased, which no sane
# request means, and a bound keeps a typo (100 for 1.00) from silently wrecking output.
MAX_REPETITION_PENALTY = 10.0
# Below 1 a seen token's positive logit is divided by the penalty: at 1e-38 and less that is inf in float32, and
# the request failed in the sampler as a server error. 0.01 (a seen token 100x as likely) is already extreme.
MIN_REPETITION_PENALTY = 0.01
# OpenAI's and vLLM's default cap on top_logprobs.
MAX_LOGPROBS = 20
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


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs: a dict (OpenAI's shape, string keys allowed) or pairs."""
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, str | bytes) or not isinstance(bias, Iterable):
        raise ValueError(f"logit_bias must be a mapping of token ids to biases, got {bias!r:.80}")
    else:
        items = [tuple(pair) for pair in bias]
    pairs: dict[int, float] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"logit_bias must be a mapping of token ids to biases, got {item!r:.80}")
        key, value = item
        if isinstance(key, str):
            if not (key.strip().isascii() and key.strip().isdigit()):  # "²" and "٣" are digits too
                raise ValueError(f"logit_bias keys must be token ids, got {key!r:.40}")
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r:.40}")
        pairs[key] = value
    return tuple(sorted(pairs.items()))


def _as_tuple(name: str, values: object) -> tuple[object, ...]:
    if isinstance(values, str | bytes | dict) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list, got {values!r:.80}")
    return tuple(values)
