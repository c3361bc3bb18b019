"""The speculator's proposal through CUDA graphs ranks exactly as the eager proposal (GPU); a batch size
without a graph is ranked eagerly, and a capture that cannot happen stops the engine's start (CPU)."""

from __future__ import annotations

import pytest
import torch

from specdesk.engine.speculators.candidates import propose_nodes
from specdesk.engine.speculators.cuda_graph import GraphedNodeRanker
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig


def _speculator(device: str) -> MLPSpeculator:
    torch.manual_seed(0)
    config = MLPSpeculatorConfig(vocab_size=96, emb_dim=32, inner_dim=32, n_predict=3)
    return MLPSpeculator(config).to(device).eval()


def _check(ranker: GraphedNodeRanker, spec: MLPSpeculator, device: str) -> None:
    for batch, depths in ((1, [3]), (2, [1, 3]), (3, [2, 3, 1]), (1, [2]), (2, [3, 2])):
        # New inputs every call: a graph must read them, not what it was captured with.
        z = torch.randn(batch, 32, device=device)
        last = torch.randint(0, 96, (batch,), device=device)
        with torch.no_grad():
            expected = propose_nodes(spec, z, last, 16, max_depth=depths)
        assert ranker(z, last, depths) == expected


def test_batch_sizes_without_a_graph_rank_eagerly() -> None:
    spec = _speculator("cpu")
    _check(GraphedNodeRanker(spec, 16, [], torch.device("cpu"), torch.float32), spec, "cpu")


def test_a_capture_that_fails_stops_the_start_with_the_way_out() -> None:
    with pytest.raises(RuntimeError, match="enforce_eager"):  # CPU tensors cannot be captured
        GraphedNodeRanker(_speculator("cpu"), 16, [1], torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_proposal_matches_eager_on_cuda() -> None:
    spec = _speculator("cuda")
    ranker = GraphedNodeRanker(spec, 16, [1, 2], torch.device("cuda"), torch.float32)
    assert sorted(ranker._graphs) == [1, 2]  # batch 3 is ranked eagerly
    _check(ranker, spec, "cuda")
