"""Conversation affinity under the console's workload, on two replicas behind `AffinityRouter`:

* the benchmark's conversations (persona system prompts, 10 conversations x 4 turns, concurrent) are
  served from cache on their later turns (at least 80 % of those turns' prompt tokens);
* 50 console conversations (`ChatService`, routed by conversation id) split over the two replicas
  within +-30 % of an even split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from specdesk.engine import SamplingParams
from specdesk.engine.config import EngineConfig
from tests.distributed.conftest import connect, deploy, record_requests, serve, settings_for

APP = "workload"


@pytest.fixture(scope="module")
def llm(ray_cluster: None, persona_engine_settings: EngineConfig) -> Iterator[Any]:
    from specdesk.distributed.app import ClusterConfig, engine_deployment

    settings = settings_for(persona_engine_settings)
    remote = connect(deploy(engine_deployment(settings, ClusterConfig(num_replicas=2)), APP), num_replicas=2)
    yield remote
    remote.shutdown()
    serve.delete(APP)


@pytest.mark.timeout(300)
def test_later_turns_are_served_from_cache(llm: Any) -> None:
    from benchmarks.affinity import moved_turns, play, scripts, summarize

    workload = scripts(10, 4)
    assert len({s.persona for s in workload}) >= 3  # several personas' system prompts, not one
    records = play(llm, workload, SamplingParams(max_tokens=8, ignore_eos=True))
    summary = summarize("affinity", records)

    assert summary["num_turns"] == 40
    assert summary["cached_share_turn2plus"] >= 0.8, summary
    assert len(summary["turns_per_replica"]) == 2, summary  # both replicas took conversations
    # The persona's system prompt is most of a tiny-tokenizer prompt and any replica may have it cached,
    # so what shows affinity is this: later turns stay on their conversation's replica (random routing
    # would keep about half of the 30; the load bound may move a few under a burst), and a turn that
    # stayed reuses its whole earlier prompt (less its last partial page).
    block = llm.info.block_size
    moved = moved_turns(records)
    previous = {(r.conversation, r.turn): r for r in records}
    stayed = [r for r in records if r.turn >= 2 and r not in moved]
    assert len(stayed) >= 22, summary
    for r in stayed:
        assert r.num_cached_tokens > previous[r.conversation, r.turn - 1].num_prompt_tokens - block, r


@pytest.mark.timeout(300)
def test_fifty_conversations_split_across_the_replicas(
    llm: Any, persona_engine_settings: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specdesk.app.chat_service import ChatService
    from specdesk.app.turns import TurnState
    from specdesk.db import ChatRepository, make_engine

    requests = record_requests(llm, monkeypatch)
    service = ChatService(llm, ChatRepository(make_engine("sqlite://")), settings_for(persona_engine_settings))
    personas = [key for _, key in service.personas()]
    params = SamplingParams(max_tokens=1)
    conversations = []
    for i in range(50):
        conversation = service.new_conversation(personas[i % len(personas)], customer_name=f"Customer {i}")
        final = list(service.send(conversation.id, f"Hello, this is about ticket {9000 + i}. Any news?", params))[-1]
        assert final.state is TurnState.COMPLETE, final
        conversations.append(conversation.id)
    assert len(requests) == 50
    per_replica = Counter(r.replicas[-1] for r in requests)
    assert len(per_replica) == 2, per_replica
    assert all(0.35 * 50 <= n <= 0.65 * 50 for n in per_replica.values()), per_replica
    # The split is by conversation: a conversation's next turn goes where its first one went.
    again: Counter[bool] = Counter()
    for conversation_id, first in zip(conversations[:3], requests[:3], strict=True):
        list(service.send(conversation_id, "And one more thing.", params))
        again[requests[-1].replicas[-1] == first.replicas[-1]] += 1
    assert again == Counter({True: 3}), again
