"""IBM's candidate generation: a beam over the speculator's heads, keeping the best whole paths.

At head i every branch keeps its top k_i tokens, so after n_predict heads there are prod(k_i) leaves
(5 * 4 * 3 = 60 for IBM's [5, 4, 3]). A leaf's score is the sum of its tokens' log-probabilities,

    score(path) = sum_i log softmax(head_i(s_i))[t_i],

and the n_candidates best leaves are kept. Each head's input token is the branch's own previous guess
(head 0 reads the base model's last token), and its state is the branch parent's state.
"""

from __future__ import annotations

import math
from array import array

import torch
import torch.nn.functional as F

from specdesk.engine.speculators.draft_penalty import DraftPenalty
from specdesk.engine.speculators.draft_vocab import Int8LinearKeepingWeight
from specdesk.engine.speculators.mlp import MLPSpeculator
from specdesk.kernels import cpu_int8


def beam_top_k(top_k: list[int], n_candidates: int, width: int) -> list[int]:
    """Top-k per head for a tree of `width` paths: the speculator's own (IBM's [5, 4, 3]) up to its
    n_candidates, each k scaled by round((width / n_candidates) ** (1/3)) beyond, so every head widens alike
    ([10, 8, 6] for 64 paths): a wide tree picks its paths from enough leaves."""
    if width <= n_candidates:
        return list(top_k)
    factor = max(1, round((width / n_candidates) ** (1 / 3)))
    return [k * factor for k in top_k]


@torch.no_grad()
def propose(
    speculator: MLPSpeculator,
    hidden: torch.Tensor,
    last_tokens: torch.Tensor,
    top_k_per_head: list[int] | None = None,
    n_candidates: int | None = None,
    num_heads: int | None = None,
    penalty: DraftPenalty | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate paths for a batch of sequences.

    hidden [b, emb_dim]: the base hidden state (after the final norm) that produced last_tokens [b].
    top_k_per_head / n_candidates default to the speculator config; num_heads (<= n_predict) truncates
    the paths (adaptive speculation length). penalty: the sequences' repetition penalties, for a speculator
    trained with them (`draft_penalty`).
    Returns (tokens int64 [b, n, num_heads], scores float32 [b, n]) with n = min(n_candidates, leaves),
    best path first (scores descending).
    """
    config = speculator.config
    num_heads = num_heads or speculator.n_predict
    assert 1 <= num_heads <= speculator.n_predict, (num_heads, speculator.n_predict)
    top_k = list(top_k_per_head or config.top_k_tokens_per_head)[:num_heads]
    assert len(top_k) == num_heads, (top_k, num_heads)
    n = min(n_candidates or config.n_candidates, math.prod(top_k))
    b = hidden.shape[0]
    assert last_tokens.shape == (b,), (last_tokens.shape, b)

    state = speculator.scale(hidden)[:, None, :]  # [b, branches=1, d]
    prev = last_tokens[:, None].long()  # [b, branches]
    paths = torch.empty(b, 1, 0, dtype=torch.long, device=hidden.device)  # [b, branches, depth]
    scores = torch.zeros(b, 1, device=hidden.device)  # [b, branches], float32 sums
    for i, k in enumerate(top_k):
        state, paths, scores = _children(speculator, i, state, prev, paths, scores, k, penalty)
        width = paths.shape[1]
        state = state[:, :, None, :].expand(-1, -1, k, -1).reshape(b, width, -1)
        prev = paths[:, :, -1]
    best_scores, best = scores.topk(n, dim=1)  # sorted: best first
    return paths.gather(1, best[:, :, None].expand(-1, -1, num_heads)), best_scores


@torch.no_grad()
def propose_nodes(
    speculator: MLPSpeculator,
    hidden: torch.Tensor,
    last_tokens: torch.Tensor,
    num_nodes: int,
    num_heads: int | None = None,
    beam: int | None = None,
    max_depth: list[int] | None = None,
    penalty: DraftPenalty | None = None,
) -> list[list[list[int]]]:
    """The best `num_nodes` draft nodes of each sequence's tree, ranked by cumulative log-probability.

    IBM's scheme keeps whole paths, so every candidate spends a node at each depth although the third
    guess of a path is far less likely to be accepted than a second-choice first token. Here every node is
    scored like a path, score(node) = sum of its tokens' log-probabilities, and the tree is the num_nodes
    best nodes: the set whose sum of path probabilities (the expected accepted length, if the speculator is
    calibrated) is largest for that many verified tokens. A child never outscores its parent, so the set is
    a tree (ties go to the shallower node). Each depth expands only its `beam` best nodes, each
    into its top num_nodes children: 1 + 2 beam head evaluations for 3 heads, against IBM's 1 + 5 + 20.
    The default beam is max(4, num_nodes // 8): on held-out replies a wider beam gains little accepted
    length, a narrower one loses at every tree size.

    max_depth: per sequence, the deepest node it may take (its adaptive speculation length; <= num_heads),
    so a shallow request in a deep batch still gets num_nodes nodes within its depth.

    Returns, per sequence, the chosen nodes as token paths, best first: the first m of them form the best
    m-node tree (tree_width.TreeWidth measures every m from one verification).
    """
    limit = None if max_depth is None else torch.tensor(max_depth, device=hidden.device)
    return node_paths(*rank_nodes(speculator, hidden, last_tokens, num_nodes, num_heads, beam, limit, penalty))


def rank_nodes(
    speculator: MLPSpeculator, hidden: torch.Tensor, last_tokens: torch.Tensor, num_nodes: int,
    num_heads: int | None = None, beam: int | None = None, max_depth: torch.Tensor | None = None,
    penalty: DraftPenalty | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`propose_nodes` on the device, without a host sync (so a CUDA graph can capture it).

    max_depth: int64 [b] or None. Returns (paths int64 [b, num_nodes, heads] padded with -1, scores float32
    [b, num_nodes], -inf where a row has fewer nodes within its depth), best first.
    """
    num_heads = num_heads or speculator.n_predict
    assert 1 <= num_heads <= speculator.n_predict, (num_heads, speculator.n_predict)
    num_heads = min(num_heads, num_nodes)  # n nodes reach depth n at most
    beam = beam or max(4, num_nodes // 8)
    b = hidden.shape[0]
    state = speculator.scale(hidden)[:, None, :]  # [b, parents=1, d]
    prev = last_tokens[:, None].long()
    parents = torch.empty(b, 1, 0, dtype=torch.long, device=hidden.device)  # [b, parents, depth]
    parent_scores = torch.zeros(b, 1, device=hidden.device)
    per_depth: list[torch.Tensor] = []  # per depth [b, nodes, depth + 1]
    node_scores: list[torch.Tensor] = []
    k = min(num_nodes, speculator.vocab_size if speculator.draft_vocab is None else len(speculator.draft_vocab))
    for i in range(num_heads):
        state, paths, scores = _children(speculator, i, state, prev, parents, parent_scores, k, penalty)
        per_depth.append(paths)
        node_scores.append(scores)
        if i + 1 < num_heads:
            keep = scores.topk(min(beam, paths.shape[1]), dim=1).indices  # [b, beam]
            parents = paths.gather(1, keep[:, :, None].expand(-1, -1, i + 1))
            parent_scores = scores.gather(1, keep)
            state = state.gather(1, (keep // k)[:, :, None].expand(-1, -1, state.shape[-1]))
            prev = parents[:, :, -1]
    # A stable sort over nodes laid out shallowest first puts a parent before a child of equal score.
    scores = torch.cat(node_scores, dim=1)
    if max_depth is not None:
        depth = torch.cat([torch.full((s.shape[1],), i + 1, device=scores.device) for i, s in enumerate(node_scores)])
        scores = scores.masked_fill(depth[None, :] > max_depth[:, None], float("-inf"))
    best, order = (t[:, :num_nodes] for t in scores.sort(dim=1, descending=True, stable=True))
    # Every node's path padded to num_heads with -1, gathered on the device: one transfer for all rows.
    padded = torch.cat([F.pad(p, (0, num_heads - p.shape[2]), value=-1) for p in per_depth], dim=1)
    return padded.gather(1, order[:, :, None].expand(-1, -1, num_heads)), best


def node_paths(paths: torch.Tensor, scores: torch.Tensor) -> list[list[list[int]]]:
    """`rank_nodes`' tensors as lists of token paths per sequence; a node past its row's max_depth (score
    -inf, when too few lie within it) is dropped."""
    rows = paths.masked_fill(scores.isinf()[:, :, None], -1).tolist()
    out = []
    for row in rows:
        paths_of_row = [[t for t in path if t >= 0] for path in row]
        out.append([p for p in paths_of_row if p])
    return out


def _children(
    speculator: MLPSpeculator, i: int, state: torch.Tensor, prev: torch.Tensor, paths: torch.Tensor,
    scores: torch.Tensor, k: int, penalty: DraftPenalty | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Head i on every branch: its state [b, branches, d] after the step, and the top-k children of every
    branch as paths [b, branches * k, i + 1] (branch-major: a branch's children are adjacent) with their
    summed log-probabilities [b, branches * k]. With a penalty, each branch's path counts as seen."""
    state = speculator.step(i, state, prev)  # [b, branches, d]
    logits = speculator.logits(i, state).float()  # [b, branches, vocab]
    if penalty is not None:
        b, branches = paths.shape[0], paths.shape[1]
        rows = torch.arange(b, device=logits.device).repeat_interleave(branches)
        path_cols = speculator.columns()[paths.reshape(b * branches, -1)]
        logits = penalty.apply(logits.reshape(b * branches, -1), rows, path_cols).reshape(b, branches, -1)
    logp = F.log_softmax(logits, dim=-1)
    top_logp, top_cols = logp.topk(k, dim=-1)  # [b, branches, k]
    b, width = paths.shape[0], paths.shape[1] * k
    ids = speculator.vocab_ids(top_cols)[..., None]
    children = torch.cat([paths[:, :, None, :].expand(-1, -1, k, -1), ids], dim=-1).reshape(b, width, i + 1)
    return state, children, (scores[:, :, None] + top_logp).reshape(b, width)


class Int8NodeRanker:
    """`propose_nodes` for a speculator packed as int8 (`draft_vocab.pack_for_cpu`): the same nodes from the same
    bits, with a fraction of the work. This is the CPU int8 path's proposal, where a step takes ~7 ms and an eager
    op ~20-60 us (the base model's pass has just evicted torch's code and data from the caches).

    * Fused weights: the W8A8 kernel sums every output channel of every row exactly in int32, independently of
      the other rows and channels, so head i's draft head and head i + 1's projection are one
      [draft_vocab + d, d] matmul over head i's states, and each parent state is projected once, not once per
      child the beam keeps. Heads after the first read only draft tokens: their scaled embeddings are a table.
    * Pruning: a child never outscores its parent and sorts after it, so a node with m - 1 nodes ahead of it in
      the ranking (m = num_nodes) has no child among the best m; nor has a node the beam keeps in place of such
      a node's children, as it sorts after them. Such nodes are not expanded: the deeper heads run on fewer
      rows, or not at all (at width 4 the default speculator's third head ran on about one step in four).
      Deciding that needs each head's scores on the host, so here the beam and the final ranking are host
      lists (`rank_nodes` keeps everything on the device for CUDA graphs).
    """

    def __init__(self, spec: MLPSpeculator, num_nodes: int) -> None:
        assert self.fits(spec) and spec.draft_vocab is not None, "pack_for_cpu(spec, int8=True) first"
        self.spec, self.num_nodes, self.vocab = spec, num_nodes, len(spec.draft_vocab)
        self.token_ids: list[int] = spec.draft_vocab.tolist()
        heads = [h.weight for h in spec.packed_heads if isinstance(h, Int8LinearKeepingWeight)]
        projs = [p.weight for p in spec.proj if isinstance(p, Int8LinearKeepingWeight)]
        fused = [torch.cat([heads[i], projs[i + 1]]) for i in range(spec.n_predict - 1)]
        self.fused = [cpu_int8.quantize_weight(w.float()) for w in fused]  # row for row the unfused weights
        # The deepest head a call runs reads its draft head alone: no next projection to compute.
        self.heads = [h.weight_int8 for h in spec.packed_heads if isinstance(h, Int8LinearKeepingWeight)]
        first = spec.proj[0]
        assert isinstance(first, Int8LinearKeepingWeight)
        self.first = first.weight_int8  # called without the module's overhead
        # emb_scale * emb_i[t] as MLPSpeculator.step computes it, for every draft token (one table per embedding).
        self.emb_scale = spec.emb_weight / spec.state_weight
        tables: dict[int, torch.Tensor] = {}
        self.tables = [
            tables.setdefault(id(spec.emb[i]) if spec.emb is not None else 0,
                              self.emb_scale * spec.embed(i, spec.draft_vocab).float())
            for i in range(1, spec.n_predict)
        ]  # fmt: skip

    @staticmethod
    def fits(spec: MLPSpeculator) -> bool:
        """Whether spec's projections and draft heads are int8 linears that kept their float weights."""
        linears = [*spec.proj, *spec.packed_heads]
        return bool(spec.packed_heads) and all(isinstance(m, Int8LinearKeepingWeight) for m in linears)

    @torch.no_grad()
    def __call__(
        self, hidden: torch.Tensor, last: torch.Tensor, num_heads: int, max_depth: list[int],
        penalty: DraftPenalty | None = None, num_nodes: int | None = None, min_logp: float = -math.inf,
    ) -> list[list[list[int]]]:  # fmt: skip
        """`propose_nodes(spec, hidden, last, num_nodes, num_heads, max_depth=max_depth, penalty=penalty)` for
        float32 hidden; num_nodes defaults to the ranker's. Fewer nodes run fewer heads (one node: the first
        head alone) and give the top of the larger ranking: every node of the best m has fewer than m - 1 ahead
        of it, so it is computed and expanded alike (for pools under 40 nodes, where the beam is 4 either way).
        min_logp: the nodes whose path log-probability is below it are left out, the top of the same ranking
        (a child never outscores its parent): such a node is not expanded either, so where the speculator is
        unsure the deeper heads do not run."""
        spec, vocab = self.spec, self.vocab
        m = self.num_nodes if num_nodes is None else num_nodes
        assert 1 <= num_heads <= spec.n_predict, (num_heads, spec.n_predict)
        beam, k, b = max(4, m // 8), min(m, vocab), hidden.shape[0]
        # Per sequence, its nodes in rank_nodes' layout (depth by depth; a depth's nodes by kept parent, then by
        # child rank) as (score, depth, draft column, parent node or -1), and the nodes to expand next as
        # (node, row of the batch that computes their children).
        nodes: list[list[tuple[float, int, int, int]]] = [[] for _ in range(b)]
        expand: list[list[tuple[int, int]]] = [[(-1, r)] for r in range(b)]
        x = cpu_int8.linear(spec.scale(hidden), self.first) + self.emb_scale * spec.embed(0, last).to(hidden.dtype)
        deepest = min(num_heads, m, max(max_depth))
        if penalty is not None:  # each row's sequence and draft path (as columns), depth by depth
            of_seq, path_cols = torch.arange(b), torch.empty(b, 0, dtype=torch.long)
        for i in range(deepest):
            weight = self.fused[i] if i + 1 < deepest else self.heads[i]
            out = cpu_int8.linear(spec.norm_act(i, x), weight)  # [rows, vocab (+ d: proj_{i+1})]
            logits = out[:, :vocab] if penalty is None else penalty.apply(out[:, :vocab], of_seq, path_cols)
            top, col = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
            logps, cols = top.tolist(), col.tolist()
            rows: list[int] = []  # per node to expand: the row that scored it (its parent's), then its column
            tokens: list[int] = []
            seqs: list[int] = []  # and, for a penalty, its sequence and its path's columns
            paths: list[list[int]] = []
            for r, parents in enumerate(expand):
                first, made_by = len(nodes[r]), []  # made_by: the row that scored each new node
                for node, row in parents:
                    scores = logps[row] if node < 0 else _add_float32(nodes[r][node][0], logps[row])
                    nodes[r] += [(s, i + 1, c, node) for s, c in zip(scores, cols[row], strict=True)]
                    made_by += [row] * k
                expand[r] = []
                if i + 2 > min(max_depth[r], deepest):
                    continue  # deeper nodes could not be taken
                for q in self._keep(nodes[r], first, beam, m, min_logp):
                    expand[r].append((q, len(rows)))
                    rows.append(made_by[q - first])  # its children start from its parent's projected state
                    tokens.append(nodes[r][q][2])
                    if penalty is not None:
                        seqs.append(r)
                        paths.append(self._columns(nodes[r], q))
            if not rows:
                break
            index = torch.tensor([rows, tokens])
            if penalty is not None:
                of_seq, path_cols = torch.tensor(seqs), torch.tensor(paths)
            x = out[:, vocab:].index_select(0, index[0]) + self.tables[i].index_select(0, index[1])
        return [self._paths(n, m, min_logp) for n in nodes]

    @staticmethod
    def _keep(nodes: list[tuple[float, int, int, int]], first: int, beam: int, m: int, min_logp: float) -> list[int]:
        """The beam of the newest depth (nodes[first:]), best first, less those with m - 1 nodes ahead of them
        in the final ranking (score, then layout: a stable sort of everything computed so far) and those
        scored below min_logp (their children would be too)."""
        kept = sorted(range(first, len(nodes)), key=lambda q: -nodes[q][0])[:beam]
        ahead = set(sorted(range(len(nodes)), key=lambda q: -nodes[q][0])[: m - 1])
        return [q for q in kept if q in ahead and nodes[q][0] >= min_logp]

    @staticmethod
    def _columns(nodes: list[tuple[float, int, int, int]], q: int) -> list[int]:
        """The draft columns on node q's path, root side first (q's own last)."""
        cols = []
        while q >= 0:
            cols.append(nodes[q][2])
            q = nodes[q][3]
        return cols[::-1]

    def _paths(self, nodes: list[tuple[float, int, int, int]], m: int, min_logp: float) -> list[list[int]]:
        """The best m nodes as token paths, best first (a stable sort, as rank_nodes'); a node scored
        -inf is dropped, as node_paths drops it, and so is one scored below min_logp."""
        kept = (q for q, n in enumerate(nodes) if n[0] != -math.inf and n[0] >= min_logp)
        ranked = sorted(kept, key=lambda q: -nodes[q][0])
        paths = []
        for q in ranked[:m]:
            path = []
            while q >= 0:
                path.append(self.token_ids[nodes[q][2]])
                q = nodes[q][3]
            paths.append(path[::-1])
        return paths


def _add_float32(parent: float, logps: list[float]) -> list[float]:
    """parent + each logp, rounded to float32 as `rank_nodes` adds them on the device. Both are float32 values,
    so the double sum is exact (or off by far less than float32's half ulp) and one rounding gives the bits."""
    return array("f", [parent + logp for logp in logps]).tolist()
