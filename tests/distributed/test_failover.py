"""A replica dying mid-reply: the reply continues on another replica (same text as without the failure),
the caller is told, the conversation's history stays whole, Ray replaces the replica, and only the dead
replica's conversations ever move."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from specdesk.engine import FinishReason, SamplingParams
from specdesk.engine.config import EngineConfig
from tests.distributed.conftest import connect, deploy, serve, wait_for
from tests.distributed.conftest import kill_replica as kill
from tests.distributed.test_replicas import opening, turn

pytestmark = pytest.mark.timeout(300)
APP = "failover"


@pytest.fixture(scope="module")
def llm(ray_cluster: None, engine_settings: EngineConfig) -> Iterator[Any]:
    from ray.serve.config import RequestRouterConfig

    from specdesk.distributed.router import AffinityRouter
    from tests.distributed.slow_replica import SlowReplica

    deployment = serve.deployment(SlowReplica).options(
        name="SlowReplica", num_replicas=2, max_ongoing_requests=4, ray_actor_options={"num_cpus": 1},
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter),
    )  # fmt: skip
    remote = connect(deploy(deployment.bind(dataclasses.asdict(engine_settings), 0.03), APP), num_replicas=2)
    yield remote
    remote.shutdown()
    serve.delete(APP)


def placement(llm: Any, num: int) -> dict[int, str]:
    return {i: turn(llm, opening(i), max_tokens=1)[1][-1] for i in range(num)}


def test_a_replica_dying_mid_reply(llm: Any) -> None:
    before = placement(llm, 8)
    assert len(set(before.values())) == 2, before
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    expected = llm.chat(opening(0), params)

    request_id = llm.submit(opening(0), params)
    request = llm._requests[request_id]
    deltas = llm.deltas(request_id)
    head = [next(deltas) for _ in range(10)]
    dead = request.replicas[-1]
    kill(dead)
    tail = list(deltas)
    final = tail[-1]

    # Continued on the other replica: nothing lost, nothing repeated, the same greedy text.
    assert request.replicas[0] == dead and len(request.replicas) == 2 and request.replicas[1] != dead
    assert "".join(d.text for d in head + tail) == expected.text
    assert [t for d in head + tail for t in d.token_ids] == expected.token_ids
    assert final.finish_reason is FinishReason.LENGTH and final.error is None
    assert "stopped after" in final.notice and "another replica" in final.notice
    assert final.metrics.num_generated_tokens == 60
    assert not any(getattr(d, "notice", None) for d in head)

    # Only the dead replica's conversations moved; the others never left their replica.
    survivor = request.replicas[1]
    during = placement(llm, 8)
    assert all(during[i] == survivor for i in before if before[i] == survivor), (before, during)

    # Ray replaces the replica; the replacement takes the dead one's rank, so exactly its conversations
    # go there and the survivor's stay.
    def replaced() -> bool:
        now = placement(llm, 8)
        return all(now[i] == survivor if before[i] == survivor else now[i] not in (dead, survivor) for i in before)

    wait_for(replaced, 120, "the replacement replica to take the dead replica's conversations")


def test_the_retry_failing_too_ends_the_reply_with_an_error(llm: Any) -> None:
    wait_for(lambda: len(set(placement(llm, 8).values())) == 2, 120, "two replicas")
    request_id = llm.submit(opening(2), SamplingParams(max_tokens=200, ignore_eos=True))
    request = llm._requests[request_id]
    deltas = llm.deltas(request_id)
    received = [next(deltas) for _ in range(5)]
    kill(request.replicas[-1])
    while len(request.replicas) < 2:
        received.append(next(deltas))
    kill(request.replicas[-1])
    received += list(deltas)
    final = received[-1]
    assert final.finish_reason is FinishReason.ERROR and "retry failed" in (final.error or "")
    assert sum(len(d.token_ids) for d in received) >= 5  # the partial reply reached the caller


def test_a_reply_under_output_penalties_and_a_grammar_resumes_exactly(llm: Any) -> None:
    # The reply so far travels as the retry's output (not its prompt): output-only penalties keep counting
    # it and the grammar stands after it, so the continuation is what one replica would have written.
    from specdesk.engine.structured_output import StructuredOutput

    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 400}}, "required": ["note"]}
    for params in (
        SamplingParams(max_tokens=60, ignore_eos=True, frequency_penalty=0.8),
        SamplingParams(max_tokens=60, structured_output=StructuredOutput("json_schema", schema)),
    ):
        wait_for(lambda: len(set(placement(llm, 8).values())) == 2, 120, "two replicas")
        expected = llm.chat(opening(3), params)
        request_id = llm.submit(opening(3), params)
        request = llm._requests[request_id]
        deltas = llm.deltas(request_id)
        head = [next(deltas) for _ in range(5)]
        kill(request.replicas[-1])
        tail = list(deltas)
        assert len(request.replicas) == 2 and tail[-1].error is None, (request.replicas, tail[-1].error)
        assert [t for d in head + tail for t in d.token_ids] == expected.token_ids
        assert "".join(d.text for d in head + tail) == expected.text
