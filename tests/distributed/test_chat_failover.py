"""A console conversation on PostgreSQL whose replica dies during its third turn, end to end:
`ChatService` over a `ChatRepository` on a throwaway PostgreSQL cluster (tests/postgres.py), with a
`RemoteLLM` on two engine replicas behind `AffinityRouter`.

The partial reply is checkpointed to the database before the kill; the turn completes on the other
replica with the earlier messages intact and the failover notice reported; the fourth turn goes to that
replica and reuses its cached pages; Ray brings the deployment back to two healthy replicas.

Skipped, with the reason, where PostgreSQL, psycopg or ray[serve] is not installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specdesk.engine import SamplingParams
from specdesk.engine.config import EngineConfig
from tests.distributed.conftest import (
    connect,
    deploy,
    kill_replica,
    record_requests,
    replica_states,
    serve,
    settings_for,
    wait_for,
)
from tests.postgres import postgres_cluster

APP = "chat-failover"
DEPLOYMENT = "SlowReplica"
DELAY_S = 0.05  # between a replica's deltas: the third turn streams long enough to be killed mid-reply


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(scope="module")
def hold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, a replica Ray starts waits before loading its engine (slow_replica.py)."""
    return tmp_path_factory.mktemp("hold") / "hold-replacements"


@pytest.fixture(scope="module")
def llm(database_url: str, ray_cluster: None, persona_engine_settings: EngineConfig, hold: Path) -> Iterator[Any]:
    from ray.serve.config import RequestRouterConfig

    from specdesk.distributed.router import AffinityRouter
    from tests.distributed.slow_replica import SlowReplica

    deployment = serve.deployment(SlowReplica).options(
        name=DEPLOYMENT, num_replicas=2, max_ongoing_requests=4, ray_actor_options={"num_cpus": 1},
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter),
        health_check_period_s=2,
    )  # fmt: skip
    engine_kwargs = dataclasses.asdict(persona_engine_settings)
    remote = connect(deploy(deployment.bind(engine_kwargs, DELAY_S, str(hold)), APP), num_replicas=2)
    yield remote
    hold.unlink(missing_ok=True)
    remote.shutdown()
    serve.delete(APP)


@pytest.mark.timeout(300)
def test_replica_killed_during_the_third_turn(
    llm: Any, database_url: str, persona_engine_settings: EngineConfig, hold: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specdesk.app.chat_service import ChatService
    from specdesk.app.turns import TurnState
    from specdesk.db import ChatRepository, MessageStatus, Role, make_engine

    repository = ChatRepository(make_engine(database_url))
    service = ChatService(
        llm, repository, settings_for(persona_engine_settings, database_url), checkpoint_interval_s=0.2
    )
    requests = record_requests(llm, monkeypatch)
    conversation = service.new_conversation("retail", customer_name="Ana")
    short = SamplingParams(max_tokens=6, ignore_eos=True)
    for text in ("Hello, my order 48213 has not arrived yet.", "It was due on Monday. Can you check?"):
        assert list(service.send(conversation.id, text, short))[-1].state is TurnState.COMPLETE
    home = requests[-1].replicas[-1]
    assert [r.replicas for r in requests] == [[home], [home]]  # affinity: both turns on one replica
    before = [(m.role, m.content, m.status) for m in repository.get_conversation(conversation.id).messages]

    # Turn 3: once some of the reply is checkpointed in the database, its replica dies.
    hold.touch()  # Ray's replacement waits until turn 4 has run (else turn 4 would go to it, uncached)
    updates = []
    checkpointed: str | None = None  # the reply's text in the database just before the kill
    num_before_kill = 0
    third_params = SamplingParams(max_tokens=80, ignore_eos=True)
    for update in service.send(conversation.id, "Also, can I change the address?", third_params):
        updates.append(update)
        if checkpointed is None and update.state is TurnState.STREAMING and update.num_tokens >= 10:
            saved = repository.get_message(update.assistant_message_id)
            if saved.content:
                assert saved.status is MessageStatus.PENDING
                checkpointed, num_before_kill = saved.content, len(updates)
                kill_replica(home)
    final = updates[-1]
    assert checkpointed, "the reply was never checkpointed before the kill"

    # The turn completed on the other replica; nothing streamed before the failure was lost.
    third = requests[2]
    assert third.replicas[0] == home and len(third.replicas) == 2, third.replicas
    survivor = third.replicas[1]
    assert final.state is TurnState.COMPLETE and final.error is None, final
    assert final.notice and "another replica" in final.notice, final
    assert final.metrics["num_generated_tokens"] == 80, final.metrics
    assert final.text.startswith(checkpointed)
    assert not any(u.notice for u in updates[:num_before_kill])  # the notice comes with the failover only
    stored = repository.get_conversation(conversation.id).messages
    assert [(m.role, m.content, m.status) for m in stored[:4]] == before  # earlier messages intact
    assert (stored[4].role, stored[5].role) == (Role.USER, Role.ASSISTANT)
    assert (stored[5].content, stored[5].status) == (final.text, MessageStatus.COMPLETE)

    # Ray has noticed: one replica running, its replacement starting (held until turn 4 is done).
    wait_for(lambda: replica_states(APP, DEPLOYMENT)[1].get("STARTING", 0) == 1, 60, "Ray to start a replacement")
    assert replica_states(APP, DEPLOYMENT)[1].get("RUNNING") == 1

    # Turn 4 goes to the survivor and reuses the pages it cached while finishing turn 3.
    fourth_final = list(service.send(conversation.id, "Thanks, that is all.", short))[-1]
    assert fourth_final.state is TurnState.COMPLETE and fourth_final.notice is None, fourth_final
    assert requests[3].replicas == [survivor]
    block = llm.info.block_size
    assert fourth_final.metrics["num_cached_tokens"] > 0
    # More than a shared persona prompt: the whole third-turn prompt (less its last partial page).
    assert fourth_final.metrics["num_cached_tokens"] >= len(third.ids) // block * block, fourth_final.metrics

    # Ray brings the deployment back to two healthy replicas.
    hold.unlink()

    def two_healthy() -> bool:
        status, states = replica_states(APP, DEPLOYMENT)
        return status == "HEALTHY" and states.get("RUNNING") == 2 and sum(states.values()) == 2

    wait_for(two_healthy, 120, "two healthy replicas")
