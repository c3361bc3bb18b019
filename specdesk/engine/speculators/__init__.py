"""Speculative decoding pieces, one noun per module (import them directly; this package imports nothing,
so the torch-free scheduler can use `gating` and `ngram` without pulling in torch):

* `decoder`    the engine's speculative decoder: proposes trees before a step, takes in verdicts after it
* `verifier`   one step's sampling and verification for the whole batch (`verify_step`)
* `tree_kind`  the node tree (best nodes) and IBM's path tree, one strategy each
* `mlp`        IBM's MLP speculator and its Hugging Face `mlp_speculator` format
* `candidates` top-k-per-head beam -> the n best draft paths (`propose`)
* `tree`       draft paths merged into a trie with its tree attention mask (`build_tree`, `DraftTree`)
* `acceptance` greedy and lossless sampled tree walks (`accept_greedy`, `accept_sampled`, `rejection_sample`)
* `ngram`      training-free suffix lookup over the sequence and earlier replies (`NgramSpeculator`)
* `gating`     when to speculate and how far (`SpeculationPolicy`)
* `tree_width` how wide a tree pays, from measured step cost and acceptance (`StepCost`, `TreeWidth`)
* `cuda_graph` the node proposal replayed as CUDA graphs
* `draft_vocab` loads a speculator folder with its draft vocabulary (training lives in `specdesk.training`)
* `default/`   the trained speculator shipped for the default model
"""

from pathlib import Path

# The trained speculator shipped for the default model (written by `python -m specdesk.training.train`).
DEFAULT_SPECULATOR_DIR = Path(__file__).parent / "default"
