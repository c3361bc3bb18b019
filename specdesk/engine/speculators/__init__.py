"""Speculative decoding pieces, one noun per module (import them directly; this package imports nothing,
so the torch-free scheduler can use `gating` and `ngram` without pulling in torch):

* `mlp`        IBM's MLP speculator and its Hugging Face `mlp_speculator` format
* `candidates` top-k-per-head beam -> the n best draft paths (`propose`)
* `tree`       draft paths merged into a trie with its tree attention mask (`build_tree`, `DraftTree`)
* `acceptance` greedy and lossless sampled checks (`accept_greedy`, `accept_sampled`, `rejection_sample`)
* `ngram`      training-free suffix lookup over the sequence and earlier replies (`NgramSpeculator`)
* `gating`     when to speculate and how far (`SpeculationPolicy`)
* `draft_vocab` loads a speculator folder with its draft vocabulary (training lives in `specdesk.training`)
* `default/`   the trained speculator shipped for the default model
"""

from pathlib import Path

# The trained speculator shipped for the default model (written by `python -m specdesk.training.train`).
DEFAULT_SPECULATOR_DIR = Path(__file__).parent / "default"
