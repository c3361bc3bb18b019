"""Speculative decoding pieces, one noun per module (import them directly; this package imports nothing,
so the torch-free scheduler can use `gating` and `ngram` without pulling in torch):

* `mlp`        IBM's MLP speculator and its Hugging Face `mlp_speculator` format
* `candidates` top-k-per-head beam -> the n best draft paths (`propose`)
* `tree`       draft paths merged into a trie with its tree attention mask (`build_tree`, `DraftTree`)
* `acceptance` greedy and lossless sampled checks (`accept_greedy`, `accept_sampled`, `rejection_sample`)
* `ngram`      training-free suffix lookup over the sequence and earlier replies (`NgramSpeculator`)
* `gating`     when to speculate and how far (`SpeculationPolicy`)
* `train`      `python -m engine.speculators.train`: IBM's two-stage recipe
* `default/`   the trained speculator shipped for the default model
"""
