"""The MLP speculator's node proposal as one CUDA graph per batch size.

On a GPU a proposal (`candidates.rank_nodes`: four heads, each an embedding, projection, norm, GELU, head,
log-softmax and top-k, then a sort over all nodes) is ~100 kernels of a few microseconds each, and
launching them from Python costs more than running them, a noticeable share of a speculative step.
Replaying a captured graph launches them all at once.

A graph has fixed shapes, so it always ranks the decoder's full pool of nodes with every head; a request's
adaptive depth enters as data (`max_depth`). The engine then verifies the first m nodes, which are the
best m-node tree within that depth (see `rank_nodes`), and measures every width from the whole ranking.

Every batch size the speculation gate admits is captured when the engine starts (as vLLM captures its
graphs), so a capture that fails stops the start with a clear error instead of leaving a serving process
with a half-captured stream; `EngineConfig(enforce_eager=True)` proposes without graphs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from specdesk.engine.speculators.candidates import node_paths, rank_nodes
from specdesk.engine.speculators.mlp import MLPSpeculator


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # static inputs, copied into before each replay
    last: torch.Tensor
    max_depth: torch.Tensor
    paths: torch.Tensor  # static outputs, valid until the next replay
    scores: torch.Tensor


class GraphedNodeRanker:
    """`propose_nodes(speculator, hidden, last, num_nodes, max_depth=...)` through captured CUDA graphs.

    Captures one graph per batch size in `batch_sizes` at construction (raising RuntimeError if capture
    fails); any other batch size is ranked eagerly, with the same result.
    """

    def __init__(
        self, speculator: MLPSpeculator, num_nodes: int, batch_sizes: Iterable[int], device: torch.device,
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.speculator, self.num_nodes = speculator, num_nodes
        self._graphs: dict[int, _Graph] = {}
        self._pool: Any = None  # one memory pool shared by every batch size's graph
        dim = speculator.config.emb_dim
        for b in batch_sizes:
            hidden = torch.zeros(b, dim, dtype=dtype, device=device)
            last = torch.zeros(b, dtype=torch.int64, device=device)
            depth = torch.full((b,), speculator.n_predict, dtype=torch.int64, device=device)
            try:
                self._graphs[b] = self._capture(hidden, last, depth)
            except Exception as exc:
                raise RuntimeError(
                    f"capturing the speculator's proposal as a CUDA graph failed ({type(exc).__name__}: {exc}); "
                    "EngineConfig(enforce_eager=True) (specdesk --enforce-eager) proposes without graphs"
                ) from exc

    def __call__(self, hidden: torch.Tensor, last: torch.Tensor, max_depth: list[int]) -> list[list[list[int]]]:
        depth = torch.tensor(max_depth, dtype=torch.int64)
        entry = self._graphs.get(hidden.shape[0])
        if entry is None:
            return node_paths(*self._rank(hidden, last, depth.to(hidden.device)))
        entry.hidden.copy_(hidden)
        entry.last.copy_(last)
        entry.max_depth.copy_(depth)
        entry.graph.replay()
        return node_paths(entry.paths, entry.scores)

    def _rank(self, hidden: torch.Tensor, last: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return rank_nodes(self.speculator, hidden, last, self.num_nodes, max_depth=depth)

    def _capture(self, hidden: torch.Tensor, last: torch.Tensor, depth: torch.Tensor) -> _Graph:
        side = torch.cuda.Stream(hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):  # warm-up off the main stream, as capture requires
            for _ in range(2):
                self._rank(hidden, last, depth)
        torch.cuda.current_stream(hidden.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            paths, scores = self._rank(hidden, last, depth)
        return _Graph(graph, hidden, last, depth, paths, scores)
