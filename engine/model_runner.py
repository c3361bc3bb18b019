"""Turns a scheduled batch into tensors, runs the model over the paged KV cache and samples.

The only engine module besides models/sampler/speculators that touches torch.
"""

from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.models.loader import LoadedModel
from engine.sampler import make_generator, sample
from engine.scheduler import ScheduledSeq


class ModelRunner:
    """Owns the model, the KV pool (one [2, num_blocks, block_size, kv_heads, head_dim] per layer) and RNGs."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        bytes_per_block = 2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim
        bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        self.num_blocks = config.num_blocks or max(2, int(config.kv_cache_memory_gib * 2**30) // bytes_per_block)
        # One allocation for every layer keeps page copies (copy-on-write) a single indexing op.
        self.kv_pool = torch.zeros(
            loaded.num_layers, 2, self.num_blocks, self.block_size, loaded.num_kv_heads, loaded.head_dim,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1]) for i in range(loaded.num_layers)]
        self.generators: dict[str, torch.Generator | None] = {}

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_pool[:, :, dst] = self.kv_pool[:, :, src]

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, sched: ScheduledSeq) -> torch.Generator | None:
        rid = sched.seq.request_id
        if rid not in self.generators:
            self.generators[rid] = make_generator(sched.seq.params.seed, self.device)
        return self.generators[rid]

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the ragged batch: input ids, positions and the attention metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        bs = self.block_size
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            tokens = seq.token_ids[start : start + s.num_new_tokens] + seq.draft_token_ids[: s.num_draft_tokens]
            end = start + len(tokens)
            input_ids += tokens
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            query_lens.append(len(tokens))
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in batch]
        dev = self.device
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens,
            query_lens_list=query_lens,
            block_size=bs,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta

    @torch.inference_mode()
    def forward(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run the base model; returns final hidden states [num_tokens, hidden] and the metadata used."""
        ids, pos, meta = self.prepare(batch)
        return self.model(ids, pos, self.kv_caches, meta), meta

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def sample_last(self, batch: list[ScheduledSeq], hidden: torch.Tensor, meta: AttentionMetadata) -> list[int]:
        """Sample one next token for each sequence that reached its last token (order of `batch`)."""
        rows, end = [], 0
        for s, q_len in zip(batch, meta.query_lens_list, strict=True):
            end += q_len
            if s.samples:
                rows.append(end - 1 - s.num_draft_tokens)
        if not rows:
            return []
        logits = self.logits(hidden[rows])
        sampling = [s for s in batch if s.samples]
        tokens = sample(logits, [s.seq.params for s in sampling], [self._generator(s) for s in sampling])
        return tokens.tolist()
