"""Turns a scheduled batch into tensors and runs the model over the paged KV cache.

It returns logits and hidden states and keeps no per-request state: sampling and verification happen in
speculators/verifier.py, the speculator's hidden states live in its decoder. The only engine module besides
models/sampler/speculators that touches torch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.config import EngineConfig
from specdesk.engine.models.loader import CPU_KERNELS, LoadedModel
from specdesk.engine.pass_graphs import Bucket, PassGraphs, bucket_sizes
from specdesk.engine.sampler import make_generator
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators.tree import DraftTree
from specdesk.kernels import cpu_lib, cpu_pages


@dataclass
class ForwardOutput:
    """What one pass yields, for the rows that decide tokens only (a prefill chunk that samples nothing has
    none): per sampling sequence, one row after its last token, or the root and every node of its draft tree.

    Sequence i of the batch owns rows row_starts[i] : row_starts[i + 1] of both tensors, in tree-row order.
    """

    logits: torch.Tensor  # float32 [num_rows, vocab]
    hidden: torch.Tensor  # [num_rows, hidden]: the final hidden states the logits were computed from
    row_starts: list[int]  # len(batch) + 1 cumulative row counts

    def rows_of(self, i: int) -> slice:
        return slice(self.row_starts[i], self.row_starts[i + 1])


class ModelRunner:
    """Owns the model and the KV pool (one [2, num_blocks, block_size, kv_heads, head_dim] per layer)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        bytes_per_block = 2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim
        bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        self.num_blocks = config.num_blocks or max(2, int(config.kv_cache_memory_gib * 2**30) // bytes_per_block)
        # One allocation for every layer keeps a page copy (accepted tree nodes) a single indexing op. The
        # pages the block manager hands out are 0 .. num_blocks - 1; one more is the graphs' scratch page
        # (padded tokens write their K/V there), never given to a sequence.
        self.pad_block = self.num_blocks
        shape = (loaded.num_layers, 2, self.num_blocks + 1, self.block_size, loaded.num_kv_heads, loaded.head_dim)
        if self.device.type == "cpu":  # on huge pages: decode's attention reads pages all over the pool
            nbytes = math.prod(shape) * torch.tensor([], dtype=self.dtype).element_size()
            self.kv_pool = cpu_pages.zeros(nbytes).view(self.dtype).view(shape)
        else:
            self.kv_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1]) for i in range(loaded.num_layers)]
        self.max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
        self.graphs: PassGraphs | None = None
        # Last, so that a runner that fails to build has taken nothing. The C kernels split the matmuls and
        # attention over their own threads. torch's own ops (norms, sampling) then run on one: two thread pools
        # spinning on the same cores slow each other down (a decode step took 3x as long), and OpenMP teams
        # started from the engine's loop thread sleep between every parallel region (kernels/cpu_int8.c says
        # why). Until close(): a process outlives its engines.
        self._threads = cpu_lib.ThreadClaim(config.num_threads) if loaded.quantization in CPU_KERNELS else None

    def close(self) -> None:
        """Give back what the runner took from the process (torch's threads, for int8); idempotent."""
        if self._threads is not None:
            self._threads.release()

    def capture_graphs(self, max_tree_nodes: int, max_spec_batch: int) -> None:
        """Capture the decode pass (every padded batch size up to max_num_seqs) and, when speculating, the
        verification pass (batch sizes up to max_spec_batch, trees up to max_tree_nodes) as CUDA graphs.
        A no-op on CPU or with enforce_eager; raises RuntimeError (with the way out) if a capture fails."""
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.graphs = self.pass_graphs(max_tree_nodes, max_spec_batch, capture=True)

    def pass_graphs(self, max_tree_nodes: int, max_spec_batch: int, capture: bool) -> PassGraphs:
        """The padded passes `capture_graphs` uses; capture=False runs them eagerly (CPU tests)."""
        buckets = [Bucket(b, 1) for b in bucket_sizes(self.config.max_num_seqs)]
        if max_tree_nodes > 0:
            sizes = bucket_sizes(min(max_spec_batch, self.config.max_num_seqs))
            buckets += [Bucket(b, q) for b in sizes for q in tree_query_lens(max_tree_nodes)]
        return PassGraphs(
            self.model, self.kv_caches, self.block_size, -(-self.max_model_len // self.block_size),
            self.max_model_len, self.pad_block, buckets, self.device, capture=capture,
        )  # fmt: skip

    def generator_for(self, seq: Sequence, position: int | None = None) -> torch.Generator | None:
        """The RNG that samples the token at `position` (default: the next one) of a request.

        A seeded request gets a generator keyed by (seed, position): every token's randomness is fixed in
        advance, so the output is the same whatever is batched with it and whether or not it speculates
        (verification samples each position with the same generator plain decoding would use).
        Unseeded requests share the process-wide RNG.
        """
        seed = seq.params.seed
        if seed is None:
            return None
        position = seq.num_tokens if position is None else position
        return make_generator((seed * 1_000_003 + position) % 2**63, self.device)

    def slot_of(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def move_kv(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy K/V of some slots to others in every layer (accepted tree nodes to their path positions).

        Every copy reads the values from before the call, so a source may be another copy's destination."""
        flat = self.kv_pool.view(*self.kv_pool.shape[:2], -1, *self.kv_pool.shape[-2:])
        src = torch.tensor(src_slots, device=self.device)
        flat[:, :, dst_slots] = flat[:, :, src]

    def prepare(
        self, batch: list[ScheduledSeq], trees: list[DraftTree | None]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the ragged batch (`_flatten`): input ids, positions and the attention metadata."""
        input_ids, positions, slots, seq_lens, query_lens = self._flatten(batch, trees)
        bs = self.block_size
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
            tree_mask=_tree_mask(query_lens, trees, dev) if any(t is not None for t in trees) else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos_t, meta

    def _flatten(
        self, batch: list[ScheduledSeq], trees: list[DraftTree | None]
    ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """(input ids, positions, KV slots, sequence lengths, query lengths) of a batch, the eager pass's and
        the graphed one's alike. A sequence contributes its new tokens, then its tree's nodes after the last
        of them (the root; forced tokens may precede it): node r takes the slot of position p + r and is
        rotated as position p + depth(r)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        bs = self.block_size
        for s, tree in zip(batch, trees, strict=True):
            seq, start = s.seq, s.seq.num_computed_tokens
            tokens = seq.token_ids[start : start + s.num_new_tokens]
            pos = list(range(start, start + len(tokens)))
            if tree is not None:
                tokens = tokens + tree.tokens
                pos += [pos[-1] + d for d in tree.depths]
            end = start + len(tokens)
            input_ids += tokens
            positions += pos
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            query_lens.append(len(tokens))
        return input_ids, positions, slots, seq_lens, query_lens

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], trees: list[DraftTree | None]) -> ForwardOutput:
        """Run the base model over the batch; see ForwardOutput for what comes back.

        A batch of decoding sequences (one new token each, with or without a draft tree) replays a captured
        graph when one fits; prefill chunks and larger shapes run eagerly, with the same results."""
        graphs = self.graphs
        if graphs is not None and all(
            s.num_new_tokens == 1 and s.samples and len(s.seq.block_table) <= graphs.max_blocks_per_seq for s in batch
        ):
            query_lens = [1 + (t.num_nodes if t is not None else 0) for t in trees]
            min_seq_len = min(s.seq.num_computed_tokens + q for s, q in zip(batch, query_lens, strict=True))
            bucket = graphs.bucket_for(len(batch), max(query_lens), min_seq_len)
            if bucket is not None:
                return self._execute_graphed(bucket, batch, trees)
        ids, pos, meta = self.prepare(batch, trees)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        rows: list[int] = []
        row_starts = [0]
        token = 0  # the sequence's first query token in the flattened batch
        for s, tree, q_len in zip(batch, trees, meta.query_lens_list, strict=True):
            if s.samples and tree is not None:
                first = token + s.num_new_tokens - 1  # the root: the last verified token
                rows += range(first, first + tree.num_nodes + 1)
            elif s.samples:
                rows.append(token + q_len - 1)
            row_starts.append(len(rows))
            token += q_len
        # The rows that decide tokens: gathered once, for the logits and for the speculator's next input.
        kept = hidden[rows] if rows else hidden[:0]
        logits = self.model.compute_logits(kept) if rows else kept.new_empty(0, 0, dtype=torch.float32)
        return ForwardOutput(logits, kept, row_starts)

    def _execute_graphed(
        self, bucket: Bucket, batch: list[ScheduledSeq], trees: list[DraftTree | None]
    ) -> ForwardOutput:
        assert self.graphs is not None
        input_ids, positions, slots, seq_lens, query_lens = self._flatten(batch, trees)  # one new token each
        masks = [t.mask() if t is not None else None for t in trees] if bucket.query_len > 1 else None
        hidden, logits, rows = self.graphs.run(
            bucket, input_ids, positions, slots, [s.seq.block_table for s in batch], seq_lens, query_lens, masks
        )
        index = torch.tensor(rows, device=self.device)
        # Gathered copies: the graph's outputs are overwritten by the next replay.
        return ForwardOutput(logits[index], hidden[index], list(itertools.accumulate(query_lens, initial=0)))


def tree_query_lens(max_tree_nodes: int) -> list[int]:
    """Query tokens per sequence of the captured verification buckets: the root plus 4, 8, 16, ... nodes,
    and the largest tree the decoder can propose."""
    sizes = [n for n in (4, 8, 16, 32, 64, 128, 256) if n < max_tree_nodes] + [max_tree_nodes]
    return [1 + n for n in sizes]


def _tree_mask(query_lens: list[int], trees: list[DraftTree | None], device: torch.device) -> torch.Tensor:
    # bool [num_tokens, max_query_len]: causal among a sequence's own new tokens, the tree's ancestor mask
    # for the root and draft rows of a speculating sequence (see AttentionMetadata.tree_mask).
    # Built in numpy (a few small ops per sequence, where torch's dispatch cost more than the work).
    width = max(query_lens)
    mask = np.zeros((sum(query_lens), width), dtype=bool)
    row = 0
    for q_len, tree in zip(query_lens, trees, strict=True):
        n = 0 if tree is None else tree.num_nodes + 1
        if q_len > n:  # the causal part (a decoding sequence's tree covers all its rows)
            mask[row : row + q_len, :q_len] = np.tri(q_len, dtype=bool)
        if tree is not None:
            mask[row + q_len - n : row + q_len, q_len - n : q_len] = tree.mask_array()
        row += q_len
    return torch.from_numpy(mask).to(device)
