"""SpecConfig: speculation's settings resolved once, device defaults in one place, every one settable."""

from __future__ import annotations

import pytest

from specdesk.engine.config import EngineConfig, SpecConfig


def test_device_defaults() -> None:
    cpu = SpecConfig.resolve(EngineConfig(speculator="ngram"), "cpu")
    cuda = SpecConfig.resolve(EngineConfig(speculator="ngram"), "cuda")
    assert cpu is not None and cuda is not None
    assert (cpu.node_pool_size, cpu.max_batch_size, cpu.step_cost_prior) == (12, 2, 0.04)
    assert (cuda.node_pool_size, cuda.max_batch_size, cuda.step_cost_prior) == (64, 16, 0.002)
    assert (cpu.max_kv_usage, cpu.max_ngram_tokens, cpu.tree, cpu.tree_width) == (0.75, 12, "nodes", None)
    assert cuda.max_ngram_tokens == 4
    assert cuda.cuda_graphs and not cpu.cuda_graphs
    assert cpu.rest and not cuda.rest  # speculation may rest where it does not pay: on every CPU path
    assert (cpu.mlp_dir, cpu.use_ngram) == (None, True)


def test_every_setting_overrides_its_default() -> None:
    config = EngineConfig(speculator="ngram", spec_max_batch_size=5, spec_pool_size=20, spec_max_kv_usage=0.5,
                          spec_step_cost_prior=0.1, spec_max_ngram_tokens=6, spec_tree="paths",
                          enforce_eager=True)  # fmt: skip
    spec = SpecConfig.resolve(config, "cuda")
    assert spec is not None
    assert (spec.max_batch_size, spec.node_pool_size, spec.max_kv_usage) == (5, 20, 0.5)
    assert (spec.step_cost_prior, spec.max_ngram_tokens, spec.tree) == (0.1, 6, "paths")
    assert not spec.cuda_graphs  # enforce_eager
    assert [SpecConfig.resolve(EngineConfig(speculator="ngram", spec_rest=r), d).rest  # type: ignore[union-attr]
            for r, d in ((True, "cuda"), (False, "cpu"))] == [True, False]  # fmt: skip
    # A fixed tree width is the node pool: nothing beyond it is ranked.
    fixed = SpecConfig.resolve(EngineConfig(speculator="ngram", spec_tree_width=7, spec_pool_size=20), "cpu")
    assert fixed is not None and (fixed.node_pool_size, fixed.tree_width) == (7, 7)


def test_speculation_off_resolves_to_none() -> None:
    assert SpecConfig.resolve(EngineConfig(speculator=None), "cpu") is None
    assert SpecConfig.resolve(EngineConfig(speculator="none"), "cuda") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec_pool_size": 0}, "spec_pool_size"),
        ({"spec_max_kv_usage": 1.5}, "spec_max_kv_usage"),
        ({"spec_step_cost_prior": -0.1}, "spec_step_cost_prior"),
        ({"spec_max_ngram_tokens": 0}, "spec_max_ngram_tokens"),
        ({"spec_max_batch_size": -1}, "spec_max_batch_size"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)  # type: ignore[arg-type]
