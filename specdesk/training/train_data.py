"""Training data for the speculator: token sequences, the base model's hidden states, flattened positions.

Stage 1 reads text: the training conversations (customer and agent turns) rendered with the chat template.
Stage 2 reads the base model's own replies to the training conversations, generated with this engine.
Either way a sequence x_0..x_{L-1} goes through the frozen base model once; h_j is its hidden state after
the final norm at position j (exactly what the engine hands the speculator), and position j becomes one
training example:

    input  h_j, t_{-1} = x_{j+1}            (the token the base model produced after j)
    target of head i:  x_{j+i+2}            (i + 2 tokens ahead of x_j), -100 past the end

Positions are independent (the speculator reads one hidden state), so batches are random sets of them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.logits_processors import penalize
from specdesk.engine.speculators.tree import common_prefix

IGNORE = -100
ChatMessages = list[dict[str, str]]


@dataclass
class TokenSequence:
    """Token ids of one sequence; positions >= `start` are training examples (earlier ones are context)."""

    tokens: list[int]
    start: int


@dataclass
class Positions:
    """Flattened training examples: hidden [N, d] (bf16) and windows [N, n_predict + 1] (int64).

    windows[:, 0] = x_{j+1} (head 0's input token); windows[:, i + 1] = x_{j+i+2}, the target of head i
    and the input of head i + 1; IGNORE past the end of the sequence.
    The tokens each position's distribution sees (x_0..x_j: what a repetition penalty reads) are
    history[begin[r]:end[r]]; the three are None for positions built without them.
    """

    hidden: torch.Tensor
    windows: torch.Tensor
    history: torch.Tensor | None = None
    begin: torch.Tensor | None = None
    end: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @classmethod
    def concat(cls, parts: Sequence[Positions]) -> Positions:
        hidden, windows = torch.cat([p.hidden for p in parts]), torch.cat([p.windows for p in parts])
        if not parts or any(p.history is None or p.begin is None or p.end is None for p in parts):
            return cls(hidden, windows)
        offsets = [0, *itertools.accumulate(len(p.history) for p in parts if p.history is not None)]
        begin = torch.cat([p.begin + o for p, o in zip(parts, offsets, strict=False) if p.begin is not None])
        end = torch.cat([p.end + o for p, o in zip(parts, offsets, strict=False) if p.end is not None])
        return cls(hidden, windows, torch.cat([p.history for p in parts if p.history is not None]), begin, end)

    def seen(self, rows: torch.Tensor, columns: torch.Tensor | None, width: int, ahead: int = 0) -> torch.Tensor:
        """[len(rows), width] bool: which logits columns (token ids, or `columns[token id]` under a draft
        vocabulary, IGNORE outside it) each row's distribution has seen in its sequence so far; with `ahead`,
        also the next `ahead` tokens (x_0..x_{j+ahead}: what head ahead - 1's distribution sees; past the
        end of a sequence the row is garbage, as its targets are)."""
        assert self.history is not None and self.begin is not None and self.end is not None
        begin, end = self.begin[rows], self.end[rows] + ahead
        span = int((end - begin).max()) if len(rows) else 0
        at = begin[:, None] + torch.arange(span)[None, :]
        inside = at < end[:, None]
        tokens = self.history[at.clamp(max=len(self.history) - 1)]
        cols = tokens if columns is None else columns[tokens]
        cols = torch.where(inside & (cols >= 0), cols, width)  # the last column collects the rest
        out = torch.zeros(len(rows), width + 1, dtype=torch.bool)
        out.scatter_(1, cols, True)
        return out[:, :width]


def chat_ids(tokenizer: Any, messages: ChatMessages, add_generation_prompt: bool) -> list[int]:
    """Render messages with the chat template and tokenize, as `LLM.apply_chat_template` does."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def with_system_prompt(conversation: ChatMessages, domain: str, index: int) -> ChatMessages:
    """The conversation as the console sends it: persona system prompt (domain or general) and a tone."""
    from specdesk.prompts.loader import build_messages, list_personas, list_tones

    personas = {p.key for p in list_personas()}
    tones: list[str | None] = [None, *(t.key for t in list_tones())]
    persona = domain if domain in personas else "general"
    return build_messages(persona, conversation, tone=tones[index % len(tones)])


def stage1_sequences(tokenizer: Any, conversations: list[tuple[str, ChatMessages]]) -> list[TokenSequence]:
    """Whole training conversations as text; every other one with the console's system prompt.

    Only positions after the system turn train: the few system prompts would otherwise dominate.
    """
    out = []
    for i, (domain, conv) in enumerate(conversations):
        messages = with_system_prompt(conv, domain, i) if i % 2 == 0 else conv
        ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
        system = chat_ids(tokenizer, messages[:1], False) if messages[0]["role"] == "system" else []
        out.append(TokenSequence(ids, common_prefix(ids, system)))
    return out


def stage2_prompts(
    tokenizer: Any, conversations: list[tuple[str, ChatMessages]], persona_every: int = 1
) -> tuple[list[list[int]], list[list[int]]]:
    """(plain, persona): conversations ready for the agent's reply, each as is (the model's default system
    prompt, as `benchmarks.bench` sends it) and every `persona_every`-th one also with the console's persona
    system prompt (longer prompts: the costlier half of the data)."""
    plain = [chat_ids(tokenizer, conv, add_generation_prompt=True) for _, conv in conversations]
    persona = [
        chat_ids(tokenizer, with_system_prompt(conv, domain, i), add_generation_prompt=True)
        for i, (domain, conv) in enumerate(conversations)
        if i % persona_every == 0
    ]
    return plain, persona


def generate_replies(
    prompts: list[list[int]],
    temperatures: list[float],
    cache_file: Path,
    *,
    model: str | None,
    dtype: str,
    max_tokens: int,
    top_p: float,
    seed: int,
    repetition_penalty: float = 1.0,
    quantization: str | None = None,
) -> list[list[int]]:
    """The base model's own continuations, generated by this engine in one continuous batch.

    temperatures: one per prompt, 0 = greedy. repetition_penalty: as the console applies it to every reply
    (transformers' definition), so the replies are the ones the speculator is verified against.
    Cached in cache_file (keyed by the prompts and settings) so a resumed run does not regenerate.
    """
    settings = [prompts, temperatures, model, dtype, max_tokens, top_p, seed]
    if repetition_penalty != 1.0:  # keeps the key of caches made before the setting existed
        settings.append(repetition_penalty)
    if quantization:
        settings.append(quantization)
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return [list(r) for r in cached["replies"]]
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(model, dtype=dtype, device="cpu", speculator=None, max_num_seqs=48, max_num_batched_tokens=1024,
              quantization=quantization)  # fmt: skip
    try:
        # A per-request seed keeps sampled replies reproducible whatever they are batched with.
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=t,
                top_p=top_p if t else 1.0,
                seed=seed + i,
                repetition_penalty=repetition_penalty,
            )
            for i, t in enumerate(temperatures)
        ]
        request_ids = [llm.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        replies = []
        for rid in tqdm(request_ids, desc="stage 2: base model replies", unit="reply"):
            replies.append([t for d in llm.deltas(rid) for t in d.token_ids])
    finally:
        llm.shutdown()  # an int8 engine gives torch its threads back: training needs them
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "replies": replies}))
    return replies


class HiddenStateExtractor:
    """Runs the engine's own model over whole sequences and returns its final-norm hidden states.

    One contiguous KV arena is reused from sequence to sequence: only the part after the longest prefix
    shared with the previous sequence is computed (sorted inputs share their system prompt).
    """

    def __init__(self, model: torch.nn.Module, loaded: Any, max_len: int, chunk: int = 256, block_size: int = 16):
        self.model, self.chunk, self.block_size = model, chunk, block_size
        num_blocks = (max_len + block_size - 1) // block_size
        shape = (num_blocks, block_size, loaded.num_kv_heads, loaded.head_dim)
        self.kv = [
            (torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype))
            for _ in range(loaded.num_layers)
        ]
        self.block_table = torch.arange(num_blocks, dtype=torch.int32)[None]
        self.hidden = torch.zeros(max_len, loaded.hidden_size, dtype=torch.bfloat16)
        self.tokens: list[int] = []

    @torch.inference_mode()
    def __call__(self, tokens: list[int]) -> torch.Tensor:
        """bf16 [len(tokens), hidden] for one sequence."""
        assert len(tokens) <= self.hidden.shape[0], (len(tokens), self.hidden.shape)
        done = min(common_prefix(tokens, self.tokens), len(tokens) - 1)  # recompute at least the last one
        for start in range(done, len(tokens), self.chunk):
            end = min(start + self.chunk, len(tokens))
            positions = torch.arange(start, end)
            meta = AttentionMetadata(
                slot_mapping=positions,  # the arena's block table is the identity: slot = position
                block_tables=self.block_table,
                seq_lens=torch.tensor([end], dtype=torch.int32),
                query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
                seq_lens_list=[end],
                query_lens_list=[end - start],
                block_size=self.block_size,
            )
            ids = torch.tensor(tokens[start:end], dtype=torch.int64)
            self.hidden[start:end] = self.model(ids, positions, self.kv, meta).to(torch.bfloat16)
        self.tokens = list(tokens)
        return self.hidden[: len(tokens)].clone()


def extract_positions(
    extractor: HiddenStateExtractor, sequences: list[TokenSequence], n_predict: int, desc: str
) -> Positions:
    """Hidden states of every sequence, flattened to training positions j >= start with a target."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].tokens)  # neighbours share prefixes
    parts = []
    total = sum(len(s.tokens) for s in sequences)
    with tqdm(total=total, desc=desc, unit="tok") as bar:
        for i in order:
            seq = sequences[i]
            hidden = extractor(seq.tokens)
            parts.append(positions_of(seq, hidden, n_predict))
            bar.update(len(seq.tokens))
    return Positions.concat(parts)


def positions_of(seq: TokenSequence, hidden: torch.Tensor, n_predict: int) -> Positions:
    """Training examples j in [start, L - 3] (head 0 needs x_{j+2}), windows padded with IGNORE."""
    tokens = torch.tensor(seq.tokens + [IGNORE] * (n_predict + 1), dtype=torch.int64)
    last = len(seq.tokens) - 3
    js = torch.arange(seq.start, max(seq.start, last + 1))
    windows = tokens[js[:, None] + 1 + torch.arange(n_predict + 1)[None, :]]
    history = torch.tensor(seq.tokens, dtype=torch.int64)
    return Positions(hidden[js], windows.reshape(-1, n_predict + 1), history, torch.zeros_like(js), js + 1)


def rows_to_end(windows: torch.Tensor) -> torch.Tensor:
    """For every position, how many rows later the last position of its reply comes (0 at that one).

    A reply's positions are one contiguous run; its last is the one whose head 0 still has a target and whose
    head 1 has none (IGNORE padding), so this needs n_predict >= 2.
    """
    if windows.shape[1] < 3:
        raise ValueError("reply ends are read from head 1's padding: needs n_predict >= 2")
    rows = torch.arange(len(windows))
    ends = torch.where((windows[:, 2] == IGNORE) & (windows[:, 1] != IGNORE), rows, len(windows))
    next_end = torch.flip(torch.cummin(torch.flip(ends, [0]), 0).values, [0])
    return next_end - rows


def base_distribution(data: Positions, idx: torch.Tensor, ahead: int, to_end: torch.Tensor, head_rows: torch.Tensor,
                      temperature: float = 1.0, penalty: float = 1.0, columns: torch.Tensor | None = None,
                      seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The base model's own next-token distribution `ahead` positions after each of idx: softmax (at
    `temperature`) of its LM head rows (the draft vocabulary's, or all) at that position's hidden state,
    [B, rows] float32, and where that position lies within the same reply [B]. For head i (ahead = i + 1)
    this is the distribution the token head i drafts is verified against, given the reply's actual prefix.

    penalty: the repetition penalty the replies are generated and verified under (transformers' definition,
    over the sequence so far: a seen token's logit divided by it where positive, multiplied where negative);
    `columns` maps token ids to head rows under a draft vocabulary (train.vocab_columns); `seen`, where given,
    is `data.seen(idx, columns, rows, ahead)`, computed once for the heads' own penalty too."""
    valid = to_end[idx] >= ahead
    later = torch.where(valid, idx + ahead, idx)
    logits = data.hidden[later].float() @ head_rows.T
    if penalty != 1.0 and data.history is not None:
        if seen is None:
            seen = data.seen(later, columns, logits.shape[1])
        logits = penalize(logits, seen, penalty)  # rows past the reply's end are not valid: whatever they saw
    return torch.softmax(logits / temperature, dim=-1), valid
