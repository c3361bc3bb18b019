"""More varied stage-2 prompts: customer messages written by the base model itself.

The hand-written training set has 84 scenarios; a speculator trained only on replies to them learns those
scenarios' phrasing and generalises poorly to new ones (held-out tokens per step fell from 2.8 on held-out
tones of seen scenarios to 2.0 on unseen conversations). Stage 2 only needs prompts whose replies look like
the base model's real work, so the base model writes new customer messages from short briefs (business,
intent, tone, a detail), sampled, and then answers them: both the message and the reply are the base
model's own text. The briefs use only the training pieces' business kinds, intents and slot values, never
prompts/eval.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

BUSINESSES = {
    "retail": "an online shop",
    "telecom": "a mobile phone and internet provider",
    "travel": "an airline",
    "banking": "a bank",
    "saas": "a software company",
    "insurance": "an insurance company",
    "healthcare_admin": "a medical clinic",
    "utilities": "an energy supplier",
    "gaming": "a video game company",
    "food_delivery": "a food delivery app",
    "streaming": "a video streaming service",
    "fitness": "a gym",
}
TONES = {
    "angry": "angry",
    "polite": "polite",
    "confused": "confused",
    "anxious": "worried",
    "terse": "impatient, very brief",
    "non_native": "non-native English speaking",
}
INSTRUCTIONS = [
    "Write the message a {tone} customer sends to the support chat of {business} about {intent}.{detail} "
    "Write only the customer's message.",
    "You are a {tone} customer of {business}. Write your message to their support team about {intent}.{detail}",
    "Write a short chat message from a {tone} customer to {business}'s customer service: {intent}.{detail}",
    "Pretend you are a customer writing to {business}. You are {tone}. Your problem: {intent}.{detail} "
    "Write the message.",
]


def briefs(pieces: dict[str, Any], count: int, seed: int) -> list[str]:
    """`count` instructions asking the base model for a customer message, varied over business, intent,
    tone, wording and one slot detail (deterministic for a seed)."""
    rng = random.Random(seed)
    combos = [
        (key, s["intent"], domain.get("slots", {}))
        for key, domain in pieces["domains"].items()
        if key in BUSINESSES
        for s in domain["scenarios"]
    ]
    out = []
    for i in range(count):
        key, intent, slots = combos[i % len(combos)]
        detail = ""
        if slots and rng.random() < 0.6:
            name, values = rng.choice(sorted(slots.items()))
            detail = f" It concerns their {name.replace('_', ' ')}: {rng.choice(values)}."
        out.append(
            rng.choice(INSTRUCTIONS).format(
                tone=TONES[rng.choice(sorted(TONES))],
                business=BUSINESSES[key],
                intent=intent.replace("_", " "),
                detail=detail,
            )
        )
    return out


def clean_message(text: str, max_chars: int = 600) -> str | None:
    """The customer message in a generation, or None when it is unusable (too short).

    Drops a leading meta line ("Here's the message:") and quotes; keeps at most max_chars, cut at a
    sentence end where one exists.
    """
    text = re.sub(r"^(sure|here)[^\n]*:\s*\n+", "", text.strip(), flags=re.IGNORECASE)
    text = text.strip().strip('"').strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "), cut.rfind("\n"))
        text = cut[: end + 1] if end > max_chars // 3 else cut
    return text.strip() if len(text.split()) >= 5 else None


def load_pieces() -> dict[str, Any]:
    from specdesk.training.build_datasets import PIECES_PATH

    return dict(json.loads(PIECES_PATH.read_text()))
