"""`python -m specdesk.training.reply_store`: the prompts it renders, and a store grown by another tone's replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from specdesk.engine.speculators.reply_store import FILE_NAME, ReplyStore
from specdesk.training.reply_store import main, prompts_of
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("reply-store"), max_position_embeddings=4096)


def test_a_tone_shift_renders_the_same_turns_in_another_voice(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    plain, shifted = prompts_of(tokenizer, 3), prompts_of(tokenizer, 3, tone_shift=1)
    assert len(plain) == len(shifted) > 1000  # every training conversation's first three customer turns
    assert all(a != b for a, b in zip(plain, shifted, strict=True))  # each conversation's tone moved on
    assert prompts_of(tokenizer, 3, tone_shift=7) == plain  # seven tones (none and six): a full turn around


def test_add_to_keeps_the_earlier_replies_first(tiny: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny), "--limit", "4", "--max-tokens", "3", "--temperatures", "0.0"]
    main(["--out", str(tmp_path / "first"), *common])
    earlier = str(tmp_path / "first" / FILE_NAME)
    first = ReplyStore.read(earlier)
    assert len(first) == 4
    main(["--out", str(tmp_path / "both"), *common, "--tone-shift", "1", "--add-to", earlier])
    both = ReplyStore.read(tmp_path / "both" / FILE_NAME)
    assert len(both) == 8 and both[:4] == first
    with pytest.raises(SystemExit, match="not whole sets over 3 prompts"):
        main(["--out", str(tmp_path / "bad"), *common[:2], "--limit", "3", *common[4:], "--add-to", earlier])
