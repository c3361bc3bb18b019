"""The speculator's proposal through a CUDA graph ranks exactly as the eager proposal (GPU), and falls back
to eager ranking where capture fails (here on CPU)."""

from __future__ import annotations

import pytest
import torch

from engine.speculators.candidates import propose_nodes
from engine.speculators.cuda_graph import GraphedNodeRanker
from engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig


def _speculator(device: str) -> MLPSpeculator:
    torch.manual_seed(0)
    config = MLPSpeculatorConfig(vocab_size=96, emb_dim=32, inner_dim=32, n_predict=3)
    return MLPSpeculator(config).to(device).eval()


def _check(device: str) -> GraphedNodeRanker:
    spec = _speculator(device)
    ranker = GraphedNodeRanker(spec, 16)
    for batch, depths in ((1, [3]), (2, [1, 3]), (1, [2]), (2, [3, 2])):
        # New inputs every call: the graph must read them, not what it was captured with.
        z = torch.randn(batch, 32, device=device)
        last = torch.randint(0, 96, (batch,), device=device)
        with torch.no_grad():
            expected = propose_nodes(spec, z, last, 16, max_depth=depths)
        assert ranker(z, last, depths) == expected
    return ranker


def test_eager_fallback_where_capture_fails() -> None:
    ranker = _check("cpu")
    assert ranker.eager  # CPU tensors cannot be captured: ranked eagerly, same nodes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_proposal_matches_eager_on_cuda() -> None:
    ranker = _check("cuda")
    assert not ranker.eager and sorted(ranker._graphs) == [1, 2]
