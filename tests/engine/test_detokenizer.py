"""Detokenizer: streamed deltas add up to the full decode, stop strings cut cleanly, chunking never matters.

Two tiny tokenizers are trained here in milliseconds (nothing is downloaded): a sentencepiece BPE model with
byte fallback wrapped as a transformers LlamaTokenizer, and a GPT-2 style byte-level BPE from `tokenizers`.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import generate_merges

from specdesk.engine.detokenizer import IncrementalDetokenizer
from specdesk.engine.sampling_params import SamplingParams

COMMON = (
    "Hello world! Thank you for contacting support, your order #1234 has shipped.\n"
    "The quick brown fox jumps over the lazy dog. 你好，世界。 Emoji: 😀 café €100\n"
)
# Seen once only, so these characters fall outside the 98% character coverage and become byte tokens.
RARE = "我们的客服很高兴为您服务。 こんにちは、元気ですか。 🎉 👍 ❤️ naïve résumé\n"
SAMPLE = "Hello 你好 😀 hi 🎉 我们 café — The quick brown fox, thank you!"


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model_path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((COMMON * 20 + RARE).splitlines()),
        model_prefix=str(model_path.with_suffix("")),
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    # LlamaTokenizer from the .model file's pieces and scores (the sentencepiece processor reads it; the
    # protobuf-based converter is not needed).
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores))
    # The wrapper must tokenize like sentencepiece itself and the sample must really use byte fallback.
    assert tok.encode(SAMPLE, add_special_tokens=False) == sp.encode(SAMPLE)
    assert "<0xF0>" in tok.tokenize("🎉")
    return tok


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((COMMON * 20 + RARE).splitlines(), trainer)
    tk.add_tokens([AddedToken("<tool>", special=False, normalized=False)])  # added but not special
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(params=["sentencepiece", "byte_level_bpe"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("sp_tokenizer" if request.param == "sentencepiece" else "bpe_tokenizer")


def stream(tok: Any, ids: list[int], params: SamplingParams, chunk_sizes: list[int] | None = None):
    """Feed ids in chunks like the engine (plain steps or accepted speculative runs); return deltas, det."""
    det = IncrementalDetokenizer(tok, [1, 2, 3], params)
    deltas, pos, chunks = [], 0, list(chunk_sizes or [])
    while pos < len(ids) and det.stopped_by is None:
        size = chunks.pop(0) if chunks else 1
        deltas.append(det.add(ids[pos : pos + size]))
        pos += size
    if det.stopped_by is None:
        deltas.append(det.flush())
    assert "".join(deltas) == det.text
    return deltas, det


def random_ids(tok: Any, rng: random.Random, n: int) -> list[int]:
    """Uniform ids, leaning on byte tokens (where broken UTF-8 hides) and added/special tokens."""
    byte_ids = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("<0x")]
    added_ids = list(tok.added_tokens_decoder)
    ids = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.1:
            ids.append(rng.choice(added_ids))
        elif byte_ids and roll < 0.5:
            ids.append(rng.choice(byte_ids))
        else:
            ids.append(rng.randrange(len(tok)))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_add_up_to_full_decode_on_random_ids(tokenizer: Any, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(150):
        ids = random_ids(tokenizer, rng, rng.randint(1, 30))
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        for chunks in ([], [rng.randint(1, 5) for _ in ids]):
            deltas, _ = stream(tokenizer, ids, params, chunks)
            assert "".join(deltas) == full, (ids, tokenizer.convert_ids_to_tokens(ids), deltas)


def test_skipped_special_token_does_not_end_a_byte_run(sp_tokenizer: Any) -> None:
    # With skip_special_tokens the decoder never sees </s>, so "€" + </s> + <0x80> is one bad 4-byte run.
    tok = sp_tokenizer
    ids = tok.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>", "</s>", "<0x80>", "▁ok"])
    full = tok.decode(ids, skip_special_tokens=True)
    assert full.count("\ufffd") == 4 and "€" not in full
    for chunks in ([], [4, 2], [6]):
        deltas, _ = stream(tok, ids, SamplingParams(skip_special_tokens=True), chunks)
        assert "".join(deltas) == full, deltas


def test_no_replacement_char_while_streaming_valid_text(tokenizer: Any) -> None:
    text = "Emoji 😀🎉👍 naïve 我们的客服 ❤️ €100 — done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters really are split over several ids
    deltas, det = stream(tokenizer, ids, SamplingParams())
    assert det.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas), deltas


def test_split_character_is_held_until_complete(sp_tokenizer: Any) -> None:
    ids = sp_tokenizer.encode("a🎉b", add_special_tokens=False)
    pieces = sp_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-5:-1] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"], pieces
    deltas, _ = stream(sp_tokenizer, ids, SamplingParams())
    # Byte runs settle when a non-byte token ends them: ByteFallback decodes a run as a whole.
    assert deltas[-6:] == ["", "", "", "", "🎉b", ""], deltas  # the last one is flush()


def test_replacement_char_kept_where_full_decode_has_it(tokenizer: Any) -> None:
    # A lone UTF-8 continuation byte (0x80) is invalid forever: its U+FFFD must come out, in place.
    byte_0x80 = "<0x80>" if "<0x80>" in tokenizer.get_vocab() else "Ģ"  # "Ģ" is 0x80 in GPT-2's alphabet
    ids = [tokenizer.convert_tokens_to_ids(byte_0x80), *tokenizer.encode(" ok", add_special_tokens=False)]
    full = tokenizer.decode(ids)
    assert full.startswith("\ufffd")
    deltas, _ = stream(tokenizer, ids, SamplingParams())
    assert "".join(deltas) == full
    # A trailing broken character is released by flush().
    deltas, _ = stream(tokenizer, ids[::-1], SamplingParams())
    assert "".join(deltas) == tokenizer.decode(ids[::-1]) and deltas[-1].endswith("\ufffd")


def test_sentencepiece_word_spaces_survive_small_windows(sp_tokenizer: Any) -> None:
    text = "Hello world! Thank you for contacting support, the quick brown fox."
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    deltas, _ = stream(sp_tokenizer, ids, SamplingParams())
    assert "".join(deltas) == text  # the first "▁He" reads "He" (no leading space), later "▁" keep theirs
    assert " world" in deltas or " wor" in "".join(deltas[:4])


def test_decodes_only_a_small_window(tokenizer: Any) -> None:
    ids = tokenizer.encode(COMMON * 8, add_special_tokens=False)
    lengths: list[int] = []
    real_decode = tokenizer.decode

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def decode(self, window: list[int], **kwargs: Any) -> str:
            lengths.append(len(window))
            return str(real_decode(window, **kwargs))

    deltas, _ = stream(Spy(), ids, SamplingParams())
    assert "".join(deltas) == COMMON * 8
    assert len(ids) > 200 and max(lengths) <= 10, max(lengths)


def test_skipped_special_tokens_inside_text(bpe_tokenizer: Any) -> None:
    tok = bpe_tokenizer
    ids = tok.encode("Hi <|im_start|>there<tool> 😀<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        _, det = stream(tok, ids, SamplingParams(skip_special_tokens=skip))
        assert det.text == tok.decode(ids, skip_special_tokens=skip)
    assert "<tool>" in det.text and "<|im_start|>" in det.text


# ---------------------------------------------------------------- stop strings


def stop_reference(full: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Cut before the stop string that ends first (ties: the one that starts first)."""
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not hits:
        return full, None
    _, start, stop = min(hits)
    return full[:start], stop


def test_stop_string_straddling_tokens(tokenizer: Any) -> None:
    text = "Thank you for contacting support, your order has shipped."
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=("ing supp",))
    deltas, det = stream(tokenizer, ids, params)
    assert det.text == "Thank you for contact" and det.stopped_by == "ing supp"
    assert not any("ing" in d for d in deltas)
    # The kept tokens are exactly the ones needed to complete the stop string, no more.
    kept = tokenizer.decode(ids[: det.num_tokens])
    assert "ing supp" in kept and "ing supp" not in tokenizer.decode(ids[: det.num_tokens - 1])
    assert det.num_tokens_before_stop == 1  # one id per add() here: the one that completed the stop


def test_several_tokens_per_add_keep_the_same_stop_and_token_count(tokenizer: Any) -> None:
    text = "Hello world! Thank you for contacting support, your order has shipped."
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=("order", "contacting s"))
    _, one_by_one = stream(tokenizer, ids, params)
    assert one_by_one.text == "Hello world! Thank you for " and one_by_one.stopped_by == "contacting s"
    for chunk in (2, 3, 5, len(ids)):
        deltas, det = stream(tokenizer, ids, params, [chunk] * len(ids))
        assert (det.text, det.stopped_by, det.num_tokens) == (
            one_by_one.text,
            one_by_one.stopped_by,
            one_by_one.num_tokens,
        )
        # Relative to the add() that hit the stop: the engine drops that call's ids after this many.
        last_call_start = (len(deltas) - 1) * chunk
        assert det.num_tokens_before_stop == det.num_tokens - last_call_start


def test_multiple_stop_strings_first_to_end_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    _, det = stream(tokenizer, ids, SamplingParams(stop=("lazy", "fox j", "own f")))
    assert det.text == "The quick br" and det.stopped_by == "own f"
    _, det = stream(tokenizer, ids, SamplingParams(stop=("quick brown fox", "k br")))
    assert det.text == "The quic" and det.stopped_by == "k br"  # ends before the longer one completes


def test_stop_at_the_very_start(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world!", add_special_tokens=False)
    deltas, det = stream(tokenizer, ids, SamplingParams(stop=("Hel", "xyz")))
    assert det.text == "" and det.stopped_by == "Hel" and set(deltas) == {""}
    with pytest.raises(AssertionError):
        det.add(ids[:1])


def test_held_stop_prefix_is_released_by_flush(tokenizer: Any) -> None:
    ids = tokenizer.encode("Thank you", add_special_tokens=False)
    deltas, det = stream(tokenizer, ids, SamplingParams(stop=("you.", "Thank you!")))
    # Everything was a possible stop start until the stream ended; flush() hands it all out, intact.
    assert det.text == "Thank you" and det.stopped_by is None and deltas[-1] == "Thank you"
    assert det.num_tokens == len(ids) and det.num_tokens_before_stop is None


def test_flush_can_complete_a_stop_string(sp_tokenizer: Any) -> None:
    ids = sp_tokenizer.encode("ok 🎉", add_special_tokens=False)  # ends in an unsettled byte run
    deltas, det = stream(sp_tokenizer, ids, SamplingParams(stop=("🎉",)))
    assert det.text == "ok " and det.stopped_by == "🎉" and "".join(deltas) == "ok "


def test_random_stops_and_chunkings_agree_with_reference(tokenizer: Any) -> None:
    rng = random.Random(1)
    for _ in range(120):
        ids = random_ids(tokenizer, rng, rng.randint(1, 25))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if len(full) < 2:
            continue
        stops = []
        for _ in range(rng.randint(1, 3)):  # substrings of the output, so stops really hit
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randint(1, 4)])
        stops.append("zzq")  # and one that never does
        params = SamplingParams(stop=tuple(stops))
        expected = stop_reference(full, params.stop)
        results = set()
        for chunks in ([], [rng.randint(1, 6) for _ in ids], [len(ids)]):
            deltas, det = stream(tokenizer, ids, params, chunks)
            assert (det.text, det.stopped_by) == expected, (ids, stops, deltas)
            results.add(det.num_tokens)
        assert len(results) == 1, results  # the kept token count does not depend on chunking
