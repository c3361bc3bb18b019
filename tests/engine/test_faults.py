"""Bad input and internal failures: a clear error at the boundary, never a caller left waiting forever.

Sampling parameters the sampler cannot use are refused when built. Anything that goes wrong on the
engine thread outside a step (handling an abort or a reset, failing a broken step's requests) stops the
engine: every open request ends with an error delta, `LLM.error` says why, new requests are refused.
A listener that raises is dropped instead; it never ends anyone's request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine import LLM, FinishReason, SamplingParams, StreamDelta
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.models.loader import load_model
from specdesk.engine.sampler import filter_logits
from specdesk.engine.sampling_params import MIN_TEMPERATURE
from tests.helpers import wait_idle, wait_until
from tests.tiny_models import make_tiny_model

LONG = SamplingParams(max_tokens=400, ignore_eos=True)  # still running when the fault is injected

# ---------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 1e-320}, "temperature must be 0 .greedy. or at least 1e-05"),  # 0 in float32
        ({"temperature": 1e-40}, "temperature must be 0"),  # a float32 subnormal
        ({"temperature": 1e-6}, "temperature must be 0"),
        ({"temperature": -0.5}, "temperature must be 0"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": 1e39}, "temperature must be a finite number"),  # inf in float32
        ({"temperature": True}, "temperature must be a number"),
        ({"temperature": "0.7"}, "temperature must be a number"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"top_p": math.inf}, "top_p must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": True}, "top_p must be a number"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"seed": True}, "seed must be an integer"),
        ({"seed": -1}, "seed must be an integer"),
        ({"stop_token_ids": [2, True]}, "stop_token_ids must be an integer"),
        ({"stop_token_ids": 2}, "stop_token_ids must be a list"),
        ({"stop": 5}, "stop must be a list"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False"),
        ({"speculate": None}, "speculate must be True or False"),
    ],
    ids=str,
)
def test_bad_sampling_params_are_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplingParams(**kwargs)


def test_the_smallest_temperature_keeps_probabilities_finite() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 30  # wide, as real models give
    ok = SamplingParams(temperature=MIN_TEMPERATURE, top_p=1, stop="x", stop_token_ids=[3])
    assert ok.stop == ("x",) and ok.stop_token_ids == (3,)
    probs = filter_logits(logits, [ok, ok]).softmax(dim=-1)
    assert torch.isfinite(probs).all()
    # What the floor keeps out: a temperature that float32 rounds to 0 turns every probability into NaN.
    assert torch.isnan((logits / torch.tensor(1e-320, dtype=torch.float32)).softmax(dim=-1)).all()


# ---------------------------------------------------------------- the engine thread


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("faults"))


@pytest.fixture
def llm(model_path: Path) -> Iterator[LLM]:
    """A fresh engine per test (most tests here stop it for good), its steps slowed down so a long request
    is still running whenever a test injects its fault."""
    engine = LLM(model=str(model_path), dtype="float32", device="cpu", num_blocks=64, attention_backend="torch")
    step = engine.engine.step

    def slow_step() -> list[StreamDelta]:
        time.sleep(0.005)
        return step()

    engine.engine.step = slow_step  # type: ignore[method-assign]
    yield engine
    engine.shutdown()


def _drain(stream: Iterator[StreamDelta]) -> StreamDelta:
    deltas = list(stream)
    assert deltas and deltas[-1].finished
    return deltas[-1]


def _inject(target: object, name: str, error: str) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError(error)

    setattr(target, name, broken)


TRIGGERS: dict[str, tuple[Callable[[LLM], object], str, Callable[[LLM], None]]] = {
    # what fails inside the engine thread, and the public call that makes the thread run it
    "abort": (lambda llm: llm.engine, "abort", lambda llm: llm.abort("llm-999")),
    "reset": (lambda llm: llm.engine.block_manager, "reset_prefix_cache", lambda llm: llm.reset_prefix_cache()),
    "forget": (lambda llm: llm.engine, "forget_replies", lambda llm: llm.forget_replies()),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_a_failure_outside_step_ends_every_open_request_and_refuses_new_ones(llm: LLM, trigger: str) -> None:
    running = llm.stream("Hello, thank you", LONG)
    first = next(running)
    assert not first.finished
    owner, name, fire = TRIGGERS[trigger]
    _inject(owner(llm), name, f"injected {trigger} failure")
    results: dict[str, BaseException] = {}

    def blocked_generate() -> None:  # a caller waiting in generate() when the engine dies
        try:
            llm.generate(["My order"], LONG)
        except BaseException as exc:
            results["generate"] = exc

    waiter = threading.Thread(target=blocked_generate)
    waiter.start()
    wait_until(lambda: llm.stats().num_running == 2, what="both requests to run")
    fire(llm)

    final = _drain(running)
    assert final.finished and final.finish_reason == FinishReason.ERROR
    assert final.error is not None and f"injected {trigger} failure" in final.error
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert isinstance(results["generate"], RuntimeError) and "injected" in str(results["generate"])
    assert llm.error == f"the engine thread failed: RuntimeError: injected {trigger} failure"
    with pytest.raises(RuntimeError, match="stopped serving: the engine thread failed"):
        llm.submit("Yes")
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["Yes"], SamplingParams(max_tokens=2))


@pytest.mark.timeout(60)
def test_a_request_queued_but_not_yet_admitted_also_gets_the_error(llm: LLM) -> None:
    running = llm.stream("Hello, thank you", LONG)
    next(running)
    _inject(llm.engine, "abort", "injected abort failure")
    with llm._cv:  # both in the same inbox: the abort fails before the add is handled
        llm.abort("llm-999")
        queued = llm.submit("My order", LONG)
    final = _drain(llm.deltas(queued))
    assert final.finish_reason == FinishReason.ERROR and "injected abort failure" in (final.error or "")
    assert _drain(running).finish_reason == FinishReason.ERROR


@pytest.mark.timeout(60)
def test_when_failing_a_broken_step_fails_too_the_streams_still_end(llm: LLM) -> None:
    running = llm.stream("Hello, thank you", LONG)
    next(running)
    _inject(llm.engine.scheduler, "schedule", "injected step failure")
    _inject(llm.engine, "fail_all", "injected fail_all failure")
    final = _drain(running)
    assert final.finish_reason == FinishReason.ERROR
    assert final.error == "the engine thread failed: RuntimeError: injected fail_all failure" == llm.error


@pytest.mark.timeout(60)
def test_a_caller_never_waits_forever_even_if_the_thread_dies_without_a_word(llm: LLM) -> None:
    # The last resort: the thread is gone and left no final delta; the waiting caller notices on its own.
    running = llm.stream("Hello, thank you", LONG)
    next(running)
    llm._stop_serving = lambda reason, failed: None  # type: ignore[method-assign]
    _inject(llm.engine, "abort", "injected abort failure")
    llm.abort("llm-999")
    final = _drain(running)
    assert final.finish_reason == FinishReason.ERROR and final.error == "the engine thread has stopped"
    assert llm.error == "the engine thread has stopped"


@pytest.mark.timeout(60)
def test_shutdown_ends_open_streams(llm: LLM) -> None:
    running = llm.stream("Hello, thank you", LONG)
    next(running)
    llm.shutdown()
    final = _drain(running)
    assert final.finish_reason == FinishReason.ERROR and final.error == "the engine was shut down"
    assert llm.error is None  # a clean shutdown is no failure
    with pytest.raises(RuntimeError, match="shut down"):
        llm.submit("Yes")


@pytest.mark.timeout(60)
def test_a_raising_listener_is_dropped_and_serving_goes_on(llm: LLM) -> None:
    calls: list[StreamDelta] = []

    def broken_exporter(delta: StreamDelta) -> None:
        calls.append(delta)
        raise RuntimeError("injected listener failure")

    seen: list[StreamDelta] = []
    llm.add_listener(broken_exporter)
    llm.add_listener(seen.append)
    out = llm.generate(["Hello, thank you"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == FinishReason.LENGTH and len(out.token_ids) == 5
    assert len(calls) == 1  # called once, then removed
    assert seen[-1].finished  # the other listener got every delta
    assert llm.error is None
    wait_idle(llm)


@pytest.mark.timeout(60)
def test_generate_with_one_failing_request_stops_the_rest_and_keeps_no_stream(llm: LLM) -> None:
    add = llm.engine.add_request
    marker = llm.encode("Yes")

    def refuse_one(ids: list[int], *args: Any, **kwargs: Any) -> str:
        if list(ids) == marker:
            raise ValueError("injected: this request is refused")
        return add(ids, *args, **kwargs)

    llm.engine.add_request = refuse_one  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["Hello, thank you", "Yes", "Hello, thank you again"], LONG)
    wait_idle(llm)  # the third request was aborted, not left running to its end
    assert llm.stats().num_running == 0 and not llm._streams


def test_generate_refused_midway_by_a_parameter_leaves_nothing_running(llm: LLM) -> None:
    bad = SamplingParams(max_tokens=4, logit_bias={10**6: 1.0})  # checked at submit: no such token
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["Hello, thank you", "Yes"], [LONG, bad])
    wait_idle(llm)  # the first request, already submitted, was stopped and forgotten
    assert llm.stats().num_running == 0 and not llm._streams


def test_a_request_failing_in_its_step_fails_alone_and_the_others_keep_their_deltas(llm: LLM) -> None:
    with pytest.raises(ValueError, match="cache_salt must be a string"):
        llm.submit("Hello", LONG, cache_salt=b"tenant")  # type: ignore[arg-type]
    append, failing = llm.engine.scheduler.append_tokens, llm.submit("Yes, thank you", LONG)

    def fail_one(s: Any, *args: Any) -> Any:
        if s.seq.request_id == failing:
            raise RuntimeError("injected: appending failed")
        return append(s, *args)

    llm.engine.scheduler.append_tokens = fail_one  # type: ignore[method-assign]
    short = llm.submit("Hello, thank you", SamplingParams(max_tokens=1, ignore_eos=True))  # finishes in that step
    assert _drain(llm.deltas(short)).finish_reason is FinishReason.LENGTH
    final = _drain(llm.deltas(failing))
    assert final.finish_reason is FinishReason.ERROR and final.error is not None and "injected" in final.error
    llm.engine.scheduler.append_tokens = append  # type: ignore[method-assign]
    assert _drain(llm.stream("Hello", SamplingParams(max_tokens=3))).finish_reason is not FinishReason.ERROR


def test_an_aborted_stream_still_gets_the_text_it_held_back(model_path: Path) -> None:
    # Text that could start a stop string, or bytes not yet a character, wait for the next token; on an abort
    # no next token comes, so the final delta carries them: the text streamed is the ids' text, whole.
    config = EngineConfig(model=str(model_path), dtype="float32", device="cpu", attention_backend="torch")
    engine = LLMEngine(config, load_model(config.model, "float32", "cpu"))
    stops = tuple(c + "\u2603" for c in " etaoinsrhldcumy")  # any of these letters last: held back
    params = SamplingParams(max_tokens=300, stop=stops, ignore_eos=True)
    rid = engine.add_request(engine.tokenizer.encode("Hello, thank you"), params)

    def text_of(deltas: list[StreamDelta]) -> tuple[str, str]:  # (streamed, the ids' own)
        ids = [t for d in deltas for t in d.token_ids]
        own = engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return "".join(d.text for d in deltas), own

    seen: list[StreamDelta] = []
    while len(set(text_of(seen))) == 1:  # until some text is held back
        seen += engine.step()
        assert len(seen) < 250, "no text was ever held back"
    final = engine.abort(rid)
    assert final is not None and final.finish_reason is FinishReason.ABORT
    streamed, own = text_of([*seen, final])
    assert streamed == own
