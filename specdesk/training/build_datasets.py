"""Build prompts/train/conversations.jsonl from hand-written pieces, and prove it disjoint from eval.

Run ``python -m specdesk.training.build_datasets`` after editing ``prompts/train/pieces.json`` or
``prompts/train/written.jsonl``;
``--check`` only verifies that the committed file is up to date (used by the tests).

Every training entry is one hand-written scenario (84 of them, 12 domains) told in one of several
customer tones: angry/polite/confused/anxious wrap the scenario in hand-written openers and closers,
terse and non-native English have their own hand-written wording. About half the entries continue
for one to three more exchanges (agent reply, customer reply) chosen from the scenario's intent
family, so multi-turn prompts end, like every entry, with the customer's turn to answer.

``written.jsonl`` adds 360 conversations written whole, one situation each (31 domains, 60 % of them
multi-turn): free-form customer messages, unlike the templated ones, in the style real
customers write. They follow the templated rows in the output.

The evaluation set (``prompts/eval/conversations.jsonl``) is written by hand, not generated; the
builder refuses to write a training file that repeats or closely paraphrases any of its customer
messages, so the two splits cannot overlap.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from specdesk.prompts.loader import PROMPTS_DIR

PIECES_PATH = PROMPTS_DIR / "train" / "pieces.json"
WRITTEN_PATH = PROMPTS_DIR / "train" / "written.jsonl"
TRAIN_PATH = PROMPTS_DIR / "train" / "conversations.jsonl"
EVAL_PATH = PROMPTS_DIR / "eval" / "conversations.jsonl"

SEED = 20240430
TONES_PER_SCENARIO = 4
FOLLOW_UP_WEIGHTS = (0.5, 0.2, 0.2, 0.1)  # P(0, 1, 2, 3 extra exchanges)
# Customer messages this short ("No.", "Ok.") may legitimately appear in both splits.
MIN_WORDS_FOR_DUPLICATE = 4
# Word-trigram Jaccard similarity above which two openers count as paraphrases.
MAX_OPENER_SIMILARITY = 0.5

Row = dict[str, Any]


def build_train(pieces: dict[str, Any], seed: int = SEED) -> list[Row]:
    """All training entries, in a fixed order, from the pieces; same pieces and seed, same rows."""
    rng = random.Random(seed)
    tones: list[str] = pieces["customer_tones"]
    family_of = {intent: family for family, intents in pieces["families"].items() for intent in intents}
    rows: list[Row] = []
    for domain_key, domain in pieces["domains"].items():
        for index, scenario in enumerate(domain["scenarios"]):
            for tone in rng.sample(tones, TONES_PER_SCENARIO):
                slots = _make_slots(pieces["global_slots"], domain, rng)
                text = _opener(scenario, tone, pieces["tone_frames"], rng)
                messages = [{"role": "user", "content": text.format(**slots)}]
                num_follow_ups = rng.choices(range(len(FOLLOW_UP_WEIGHTS)), FOLLOW_UP_WEIGHTS)[0]
                stages = _stage_plan(pieces["stages"], family_of[scenario["intent"]], "{ref}" in text)
                for stage in stages[:num_follow_ups]:
                    exchange = rng.choice(stage)
                    messages.append({"role": "assistant", "content": exchange["agent"].format(**slots)})
                    reply = exchange["customer"].get(tone, exchange["customer"]["default"])
                    messages.append({"role": "user", "content": reply.format(**slots)})
                rows.append(
                    {
                        "id": f"train-{domain_key}-{index:02d}-{tone}",
                        "domain": domain_key,
                        "intent": scenario["intent"],
                        "tone": tone,
                        "messages": messages,
                    }
                )
    return rows


def check_disjoint(train: Sequence[Row], eval_rows: Sequence[Row]) -> None:
    """Raise ValueError when an eval customer message repeats, or an eval opener paraphrases, train."""
    train_texts = {_normalize(text) for text in _user_texts(train)}
    for row in eval_rows:
        for text in _user_texts([row]):
            if len(text.split()) >= MIN_WORDS_FOR_DUPLICATE and _normalize(text) in train_texts:
                raise ValueError(f"eval {row['id']} repeats a training message: {text!r}")
    train_openers = [(row["id"], _trigrams(row["messages"][0]["content"])) for row in train]
    for row in eval_rows:
        opener = _trigrams(row["messages"][0]["content"])
        for train_id, train_opener in train_openers:
            similarity = _jaccard(opener, train_opener)
            if similarity > MAX_OPENER_SIMILARITY:
                raise ValueError(f"eval {row['id']} paraphrases {train_id} (similarity {similarity:.2f})")


def check_rows(rows: Sequence[Row], split: str) -> None:
    """Unique ids and openers; every conversation alternates roles and ends with the customer."""
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{split}: duplicate ids")
    openers = [_normalize(row["messages"][0]["content"]) for row in rows]
    if len(set(openers)) != len(openers):
        raise ValueError(f"{split}: duplicate openers")
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
        if roles != expected or roles[-1] != "user":
            raise ValueError(f"{split} {row['id']}: roles must alternate user/assistant and end with user")
        if any("{" in m["content"] or "}" in m["content"] for m in row["messages"]):
            raise ValueError(f"{split} {row['id']}: unfilled slot")


def read_jsonl(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def to_jsonl(rows: Iterable[Row]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args(argv)
    train = build_train(json.loads(PIECES_PATH.read_text(encoding="utf-8"))) + read_jsonl(WRITTEN_PATH)
    eval_rows = read_jsonl(EVAL_PATH)
    check_rows(train, "train")
    check_rows(eval_rows, "eval")
    check_disjoint(train, eval_rows)
    text = to_jsonl(train)
    if args.check:
        if TRAIN_PATH.read_text(encoding="utf-8") != text:
            print(f"{TRAIN_PATH} is stale: run python -m specdesk.training.build_datasets")
            return 1
        return 0
    TRAIN_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {len(train)} training conversations; {len(eval_rows)} eval conversations are disjoint")
    return 0


def _make_slots(global_slots: dict[str, list[str]], domain: dict[str, Any], rng: random.Random) -> dict[str, str]:
    slots = {key: rng.choice(values) for key, values in global_slots.items() if key != "email_domain"}
    slots.update({key: rng.choice(values) for key, values in domain["slots"].items()})
    ascii_name = unicodedata.normalize("NFKD", slots["name"]).encode("ascii", "ignore").decode()
    local = re.sub(r"[^a-z]+", ".", ascii_name.lower()).strip(".")
    slots["email"] = f"{local}{rng.randint(1, 99)}@{rng.choice(global_slots['email_domain'])}"
    pattern = rng.choice(domain["ref_pattern"])
    slots["ref"] = slots["email"] if pattern == "email" else _fill_pattern(pattern, rng)
    slots["ref_label"] = domain["ref_label"]
    return slots


def _fill_pattern(pattern: str, rng: random.Random) -> str:
    # '#' is a digit, '@' an uppercase letter (no I or O, as real booking codes avoid them).
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(str(rng.randint(0, 9)) if c == "#" else rng.choice(letters) if c == "@" else c for c in pattern)


def _opener(scenario: dict[str, str], tone: str, frames: dict[str, dict[str, list[str]]], rng: random.Random) -> str:
    if tone in scenario:  # terse and non-native wording is hand-written per scenario
        return scenario[tone]
    frame = frames[tone]
    return " ".join(
        part for part in (rng.choice(frame["openers"]), scenario["text"], rng.choice(frame["closers"])) if part
    )


def _stage_plan(stages: dict[str, Any], family: str, opener_has_ref: bool) -> list[list[dict[str, Any]]]:
    # Ask for the reference only if the customer has not already given it.
    first = stages["confirm"] if opener_has_ref else stages["ask_ref"]
    return [first, stages["family"][family], stages["wrap"]]


def _user_texts(rows: Iterable[Row]) -> Iterable[str]:
    return (m["content"] for row in rows for m in row["messages"] if m["role"] == "user")


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _normalize(text).split()
    return {tuple(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def _jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
