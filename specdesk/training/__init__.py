"""Speculator training (IBM's two-stage recipe) and its data: never imported by serving code.

* `train`          `python -m specdesk.training.train`: trains and writes `specdesk/engine/speculators/default`
* `dataset`, `train_data`, `synth`  the training data: prompts/train conversations and the base model's replies
* `held_out`       held-out acceptance, walked as the engine decodes
* `draft_vocab`    builds the draft vocabulary the engine loads
* `build_datasets` builds `prompts/train/conversations.jsonl` and proves it disjoint from `prompts/eval`
"""
