"""The speculative decoder in a batch: mixed sampling modes verified together stay exact, and the decoder
alone holds each request's hidden state, only while the request runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.models.loader import load_model
from tests.tiny_models import make_tiny_model, make_tiny_speculator

PROMPTS = [
    "Your order 48213 ships today. Your order 48213 ships today. Your order",
    "Hello, thank you for contacting customer care.",
    "My order",
    [5, 17, 42, 8, 99],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def mlp_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = make_tiny_speculator(model_dir, tmp_path_factory.mktemp("mlp") / "speculator")
    return out


def test_greedy_seeded_and_unseeded_rows_verified_in_one_batch(model_dir: Path, mlp_dir: Path) -> None:
    """Every step samples all rows of all requests in one call: greedy and seeded output stays what plain
    decoding gives, each seeded row drawing with its own position's generator whatever shares the call."""
    params = [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True),  # unseeded: children drawn
        SamplingParams(temperature=0.7, top_p=0.8, seed=4, max_tokens=24, ignore_eos=True),
    ]
    outs = {}
    for name, speculator in (("plain", None), ("spec", f"{mlp_dir}+ngram")):
        llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator, spec_max_batch_size=16)
        try:
            outs[name] = [o.token_ids for o in llm.generate(PROMPTS, params)]
            if speculator is not None:
                assert llm.stats().spec_num_drafts > 0
        finally:
            llm.shutdown()
    for i in (0, 1, 3):
        assert outs["spec"][i] == outs["plain"][i], i
    assert len(outs["spec"][2]) == 24


def _engine(model_dir: Path, mlp_dir: Path, **kw: object) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=str(mlp_dir),
                          spec_max_batch_size=16, **kw)  # type: ignore[arg-type]  # fmt: skip
    return LLMEngine(config, load_model(config.model, "float32", "cpu"))


def test_hidden_states_live_only_while_their_request_runs(model_dir: Path, mlp_dir: Path) -> None:
    """Kept per running request, dropped on finish, abort and preemption (a tight pool forces preemption)."""
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    reference = _engine(model_dir, mlp_dir)
    encoded = [reference.tokenizer.encode(p) if isinstance(p, str) else p for p in PROMPTS]
    # Just big enough for the longest request (its drafts included), not for the batch.
    num_blocks = (max(len(e) for e in encoded) + 32 + 16) // 8 + 1
    engine = _engine(model_dir, mlp_dir, num_blocks=num_blocks, block_size=8, enable_prefix_caching=False)
    outputs: dict[str, dict[str, list[int]]] = {}
    for name, e in (("reference", reference), ("tight", engine)):
        spec = e.speculation
        assert spec is not None
        ids = [e.add_request(prompt, params) for prompt in encoded]
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        kept = 0
        while e.has_work:
            for delta in e.step():
                assert delta.error is None, delta.error
                tokens[delta.request_id] += delta.token_ids
            assert set(spec.hidden) <= {s.request_id for s in e.scheduler.running}
            kept = max(kept, len(spec.hidden))
        assert kept > 0 and not spec.hidden
        outputs[name] = tokens
    assert engine.scheduler.num_preemptions > 0
    assert list(outputs["tight"].values()) == list(outputs["reference"].values())
    # Abort: the request's state goes with it.
    rid = engine.add_request(engine.tokenizer.encode(PROMPTS[1]), params)
    engine.step()
    engine.step()
    assert engine.speculation is not None and rid in engine.speculation.hidden
    engine.abort(rid)
    assert not engine.speculation.hidden


def _int8_engine(
    model_dir: Path, mlp_dir: Path | None, request: pytest.FixtureRequest, **kw: object
) -> LLMEngine:  # fmt: skip
    speculator = None if mlp_dir is None else str(mlp_dir)
    config = EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu", speculator=speculator,
                          spec_max_batch_size=16, quantization="int8", **kw)  # type: ignore[arg-type]  # fmt: skip
    engine = LLMEngine(config, load_model(config.model, "bfloat16", "cpu", quantization="int8"))
    request.addfinalizer(engine.close)  # the int8 runner holds the process's threads until then
    return engine


def test_the_mlp_rests_where_its_best_width_makes_fewer_tokens_per_second(
    model_dir: Path, mlp_dir: Path, request: pytest.FixtureRequest
) -> None:
    """On the int8 CPU path (resting allowed) the MLP proposes while its best width's measured tokens per step
    over StepCost's fitted step time beat the measured steps without it, rests MLP_REST_STEPS steps when they
    do not, and looks again after; where resting is not allowed (spec_rest=False; CUDA's default) it always
    proposes. Every CPU path may rest by default, the torch path too."""
    from specdesk.engine.speculators import decoder as decoder_module

    engine = _int8_engine(model_dir, mlp_dir, request)
    spec = engine.speculation
    assert spec is not None and spec.width.allow_none
    for _ in range(20):  # width 1: its one node accepted, 2 tokens a step ...
        spec.width.record([], [[7], [8]], [7, 3])
    spec._mlp_ran = True
    for _ in range(20):  # ... in 20 ms a step of 2 query tokens: 100 tokens/s
        spec.record_lone_step(2, 2, 0.02)
    assert spec.step_cost.seconds(2) == pytest.approx(0.02)
    assert not spec._mlp_pays(1)  # nothing measured without the MLP: try that once
    spec._mlp_ran = False
    for _ in range(3):  # without the MLP: 200 tokens/s
        spec.record_lone_step(1, 1, 0.005)
    assert not spec._mlp_pays(1)
    engine.add_request([5, 17, 42, 8, 99], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_work:
        engine.step()
    rested = spec._mlp_rest
    assert 0 < rested <= decoder_module.MLP_REST_STEPS
    spec._mlp_ran = False
    for _ in range(40):  # the faster side wins once its recent steps say so (older steps fade): 20 tokens/s
        spec.record_lone_step(1, 1, 0.05)
    assert spec._mlp_pays(1)
    plain = _engine(model_dir, mlp_dir, spec_rest=False).speculation
    assert plain is not None and not plain.width.allow_none and plain._mlp_pays(1)
    torch_path = _engine(model_dir, mlp_dir).speculation
    assert torch_path is not None and torch_path.width.allow_none


def test_the_depth_takes_a_tokens_cost_over_a_plain_step_where_the_mlp_may_rest(
    model_dir: Path, mlp_dir: Path, request: pytest.FixtureRequest
) -> None:
    """StepCost's intercept there is the MLP's own steps' (proposal included): the drafts' depth prices a token by
    the fitted slope over the measured steps without the MLP, and by the prior until both are measured."""
    spec = _int8_engine(model_dir, mlp_dir, request).speculation
    assert spec is not None
    spec._mlp_ran = True
    for i in range(40):  # MLP steps: 6 ms + 1 ms per query token beyond the first
        tokens = 2 + i % 4
        spec.record_lone_step(tokens, 2, 0.006 + 0.001 * (tokens - 1))
    assert spec.step_cost.cost_per_token == pytest.approx(1 / 6)
    assert spec._token_cost() == spec.step_cost.prior  # no step without the MLP yet
    spec._mlp_ran = False
    for _ in range(5):  # without it: 4 ms a step
        spec.record_lone_step(1, 1, 0.004)
    assert spec._token_cost() == pytest.approx(0.25)


def test_the_cadence_ranks_the_pool_on_its_measuring_steps_only(
    model_dir: Path, mlp_dir: Path, request: pytest.FixtureRequest
) -> None:
    """Where the MLP may rest, one MLP step in MEASURE_EVERY ranks the whole pool (and TreeWidth records only
    those), the others rank just the nodes they verify. Output stays plain's."""
    from specdesk.engine.speculators import decoder as decoder_module

    engine = _int8_engine(model_dir, mlp_dir, request)
    spec = engine.speculation
    assert spec is not None and spec.tree_kind is not None
    # Keep the MLP proposing two nodes (a random speculator's drafts would not pay).
    spec._mlp_pays = lambda width: True  # type: ignore[method-assign]
    spec.width.choose = lambda cost_per_token, limit, allow_none=None: 2  # type: ignore[method-assign]
    asked: list[int | None] = []
    recorded: list[int] = []
    rank, record = spec.tree_kind.rank, spec.width.record

    def counting_rank(*args: object, **kwargs: object) -> object:
        asked.append(args[5] if len(args) > 5 else None)  # type: ignore[arg-type]
        return rank(*args, **kwargs)  # type: ignore[arg-type]

    def counting_record(*args: object) -> None:
        recorded.append(len(asked))
        record(*args)  # type: ignore[arg-type]

    spec.tree_kind.rank = counting_rank  # type: ignore[method-assign]
    spec.width.record = counting_record  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = engine.tokenizer.encode(PROMPTS[0])
    engine.add_request(prompt, params)
    tokens: list[int] = []
    while engine.has_work:
        for delta in engine.step():
            tokens += delta.token_ids
    full = [i for i, nodes in enumerate(asked) if nodes is None]
    assert len(asked) >= 2 * decoder_module.MEASURE_EVERY
    assert full[0] == 0 and all(b - a == decoder_module.MEASURE_EVERY for a, b in itertools.pairwise(full))
    assert set(asked) == {None, 1, 2, 3}  # the best width and its neighbours
    assert recorded == [i + 1 for i in full]  # every measuring step's verdict, no other
    assert spec.step_cost.weight > 0
    reference = _int8_engine(model_dir, None, request)
    reference.add_request(prompt, params)
    expected: list[int] = []
    while reference.has_work:
        for delta in reference.step():
            expected += delta.token_ids
    assert tokens == expected


def test_the_ngram_drafts_rest_where_they_are_measured_not_to_pay(
    model_dir: Path, mlp_dir: Path, request: pytest.FixtureRequest
) -> None:
    """Where the MLP may rest, steps verifying n-gram drafts alone are timed against steps verifying none; slower,
    the n-gram proposes nothing for NGRAM_REST_STEPS proposals. With spec_rest=False (CUDA's default) it is
    never rested."""
    from specdesk.engine.speculators import decoder as decoder_module

    config = EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu", speculator="ngram",
                          spec_max_batch_size=16, quantization="int8")  # fmt: skip
    engine = LLMEngine(config, load_model(config.model, "bfloat16", "cpu", quantization="int8"))
    request.addfinalizer(engine.close)
    spec = engine.speculation
    assert spec is not None and spec.ngram_rest is not None
    spec._mlp_ran = False
    for _ in range(30):  # a drafted step makes 1.1 tokens in 6 ms, a bare one 1 in 5 ms
        spec.record_lone_step(1, 1, 0.005)
        spec.record_lone_step(2, 1, 0.0066)
    assert spec.ngram_rest.resting == decoder_module.NGRAM_REST_STEPS
    assert spec.ngram is not None
    proposed = []
    propose = spec.ngram.propose
    spec.ngram.propose = lambda *args: proposed.append(args) or propose(*args)  # type: ignore[method-assign]
    engine.add_request([5, 17, 42, 8, 99], SamplingParams(max_tokens=12, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert not proposed and spec.ngram_rest.resting == decoder_module.NGRAM_REST_STEPS - 11  # 11 decode steps
    elsewhere = _engine(model_dir, Path(f"{mlp_dir}+ngram"), spec_rest=False).speculation
    assert elsewhere is not None and elsewhere.ngram is not None and elsewhere.ngram_rest is None
    torch_path = _engine(model_dir, Path(f"{mlp_dir}+ngram")).speculation  # every CPU path by default
    assert torch_path is not None and torch_path.ngram_rest is not None


def test_the_ledger_prices_every_lone_mlp_step_and_rests_the_mlp_where_it_loses(
    model_dir: Path, mlp_dir: Path, request: pytest.FixtureRequest
) -> None:
    """Where the MLP may rest, each lone step that verified its nodes goes into the ledger with the MLP's share of
    it: beside no n-gram draft every token but the base model's own and every node; beside an n-gram draft of
    exactly the tokens plain decoding emits, no token. Once the ledger finds the MLP losing, it rests for the
    ledger's rest, ranking nothing. Output stays plain's throughout."""
    engine = _int8_engine(model_dir, Path(f"{mlp_dir}+ngram"), request)
    spec = engine.speculation
    assert spec is not None and spec.ledger is not None and spec.tree_kind is not None and spec.ngram is not None
    spec._mlp_pays = lambda width: True  # type: ignore[method-assign]
    spec.width.choose = lambda cost_per_token, limit, allow_none=None: 2  # type: ignore[method-assign]
    ledger, records, asked, verified = spec.ledger, [], [], [0]
    record, rank, lone = ledger.record, spec.tree_kind.rank, spec.record_lone_step

    def counting_record(seconds: float, emitted: int, added: int, cost: float) -> None:
        assert spec._ledger_step is not None and seconds > 0 and cost > 0
        records.append((verified[0] - 1, emitted, added, spec._ledger_step[1]))  # nodes, tokens, the MLP's
        record(seconds, emitted, added, cost)

    def counting_lone(nodes: int, emitted: int, seconds: float) -> None:
        verified[0] = nodes
        lone(nodes, emitted, seconds)

    ledger.record = counting_record  # type: ignore[method-assign]
    spec.record_lone_step = counting_lone  # type: ignore[method-assign]
    spec.tree_kind.rank = lambda *args: asked.append(1) or rank(*args)  # type: ignore[method-assign]
    verdicts: list[bool | None] = [None]  # no verdict yet: the MLP proposes on every step
    ledger.pays = lambda: verdicts[0]  # type: ignore[method-assign]
    prompt = engine.tokenizer.encode(PROMPTS[1])

    def run(engine: LLMEngine) -> list[int]:
        engine.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_work:
            for delta in engine.step():
                tokens += delta.token_ids
        return tokens

    expected = run(_int8_engine(model_dir, None, request))
    spec.ngram.propose = lambda *args: []  # type: ignore[method-assign]
    assert run(engine) == expected
    assert 0 < len(records) <= len(asked)  # a step the budget left no draft for ranked, but verified nothing
    assert all(added == emitted - 1 and extra == nodes > 0 for nodes, emitted, added, extra in records)
    # The n-gram draft: the next 4 tokens plain decoding emits, deeper than the MLP's 3 heads reach.
    spec.ngram.propose = lambda rid, ids, *args: expected[len(ids) - len(prompt) :][:4]  # type: ignore[method-assign]
    records[:] = []
    assert run(engine) == expected
    assert records and all(added == 0 and extra < nodes for nodes, emitted, added, extra in records)
    assert sum(emitted for _, emitted, _, _ in records) > 2 * len(records)  # the drafts were accepted
    verdicts[0], asked[:], records[:] = False, [], []
    assert run(engine) == expected
    assert not asked and not records  # ranked nothing, verified no MLP node
    assert 0 < spec._mlp_rest < 15 and ledger._rest == 15  # the first rest ordered, and running down
    off = _int8_engine(model_dir, mlp_dir, request, spec_mlp_ledger=False).speculation
    assert off is not None and off.ledger is None
    assert _engine(model_dir, mlp_dir, spec_rest=False).speculation.ledger is None  # type: ignore[union-attr]
    assert _engine(model_dir, mlp_dir).speculation.ledger is not None  # type: ignore[union-attr]
