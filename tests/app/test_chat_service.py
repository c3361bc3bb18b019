"""The chat service on the real engine (tiny random-weight model) and a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from specdesk.app.chat_service import ChatService
from specdesk.app.turns import TurnState, TurnUpdate
from specdesk.db import ChatRepository, MessageStatus, NotFoundError, Role, make_engine
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm, wait_engine_idle


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("chat-service"))
    yield engine
    engine.shutdown()


@pytest.fixture
def service(llm: LLM, tmp_path: Path) -> ChatService:
    return make_service(llm, tmp_path / "specdesk.db", max_tokens=24)


def run(updates: Iterator[TurnUpdate]) -> list[TurnUpdate]:
    return list(updates)


def test_turn_streams_and_stores_reply_with_metrics(service: ChatService, tmp_path: Path) -> None:
    conversation = service.new_conversation("retail", "Dana")
    updates = service.send(conversation.id, "Where is my order 48213?")
    # Invariant 6: the customer's message is durable before any generation starts (a second
    # connection to the same file already sees it).
    other = ChatRepository(make_engine(f"sqlite:///{tmp_path / 'specdesk.db'}"))
    assert [m.content for m in other.get_conversation(conversation.id).messages] == ["Where is my order 48213?"]

    seen = run(updates)
    final = seen[-1]
    assert final.state is TurnState.COMPLETE
    assert [u.state for u in seen[:-1]] == [TurnState.WAITING] + [TurnState.STREAMING] * (len(seen) - 2)
    assert final.text == "".join(u.delta for u in seen)
    assert final.num_tokens == 24 and final.metrics["num_generated_tokens"] == 24
    assert final.metrics["finish_reason"] == "length"
    assert final.metrics["ttft_s"] > 0 and final.metrics["num_prompt_tokens"] > 0

    stored = service.repository.get_conversation(conversation.id).messages
    assert [(m.role, m.status) for m in stored] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert stored[1].content == final.text and stored[1].metrics == final.metrics
    assert not service.is_running(conversation.id)


def test_second_turn_reuses_the_cached_prefix(service: ChatService) -> None:
    conversation = service.new_conversation("telecom")
    first = run(service.send(conversation.id, "My internet is down."))[-1]
    second = run(service.send(conversation.id, "It has been down since this morning."))[-1]
    assert second.state is TurnState.COMPLETE
    # The system prompt and the first turn were prefilled once; only the new turn is computed again.
    assert second.metrics["num_cached_tokens"] >= first.metrics["num_prompt_tokens"] - 16
    assert second.metrics["num_cached_tokens"] < second.metrics["num_prompt_tokens"]


def test_stop_mid_stream_keeps_partial_reply_and_frees_pages(service: ChatService, llm: LLM) -> None:
    conversation = service.new_conversation()
    seen: list[TurnUpdate] = []
    for update in service.send(
        conversation.id, "Tell me everything about my bill.", service.sampling_params(max_tokens=4000)
    ):
        seen.append(update)
        if update.state is TurnState.STREAMING and update.num_tokens >= 5:
            assert service.stop(conversation.id)
    final = seen[-1]
    assert final.state is TurnState.STOPPED
    assert 5 <= final.num_tokens < 4000
    assert final.metrics["finish_reason"] == "abort"
    reply = service.repository.get_conversation(conversation.id).messages[-1]
    assert reply.status is MessageStatus.STOPPED and reply.content == final.text
    assert not service.stop(conversation.id)  # nothing running any more
    wait_engine_idle(llm)


def test_closing_the_stream_is_a_stop(service: ChatService, llm: LLM) -> None:
    """The browser going away closes the generator: the request is aborted, the partial text kept."""
    conversation = service.new_conversation()
    updates = service.send(conversation.id, "Hello?", service.sampling_params(max_tokens=4000))
    text = ""
    for update in updates:
        text = update.text
        if update.num_tokens >= 3:
            break
    updates.close()
    reply = service.repository.get_conversation(conversation.id).messages[-1]
    assert reply.status is MessageStatus.STOPPED and reply.content == text
    assert not service.is_running(conversation.id)
    wait_engine_idle(llm)


def test_bad_requests_fail_alone(service: ChatService, llm: LLM) -> None:
    healthy = service.new_conversation()
    broken = service.new_conversation()
    results: list[TurnUpdate] = []
    worker = threading.Thread(
        target=lambda: results.extend(service.send(healthy.id, "Hi", service.sampling_params(max_tokens=200)))
    )
    worker.start()

    with pytest.raises(ValueError, match="empty"):
        service.send(broken.id, "   ")
    with pytest.raises(ValueError, match="UTF-8"):
        service.send(broken.id, "broken \udcff bytes")
    assert service.repository.get_conversation(broken.id).messages == ()  # nothing stored for those

    # Far too long for the 8k context even alone: stored (nothing typed is lost), then a clear error.
    final = run(service.send(broken.id, "refund " * 6000))[-1]
    assert final.state is TurnState.ERROR
    assert final.error is not None and "too long for the context" in final.error
    messages = service.repository.get_conversation(broken.id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.ERROR),
    ]
    assert messages[1].error == final.error

    worker.join(timeout=60)
    assert results and results[-1].state is TurnState.COMPLETE and results[-1].num_tokens == 200
    wait_engine_idle(llm)


def test_one_turn_at_a_time_per_conversation(service: ChatService) -> None:
    conversation = service.new_conversation()
    updates = service.send(conversation.id, "First", service.sampling_params(max_tokens=4000))
    next(updates)
    with pytest.raises(ValueError, match="still being drafted"):
        service.send(conversation.id, "Second")
    updates.close()
    assert len(service.repository.get_conversation(conversation.id).messages) == 2


def test_retry_and_edit_last_replace_the_reply(service: ChatService) -> None:
    conversation = service.new_conversation()
    run(service.send(conversation.id, "My parcel is late"))
    retried = run(service.retry(conversation.id))[-1]
    assert retried.state is TurnState.COMPLETE
    edited = run(service.edit_last(conversation.id, "My parcel arrived damaged"))[-1]
    assert edited.state is TurnState.COMPLETE
    messages = service.repository.get_conversation(conversation.id).messages
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT]
    assert messages[0].content == "My parcel arrived damaged" and messages[1].content == edited.text
    empty = service.new_conversation()
    with pytest.raises(ValueError, match="no customer message"):
        service.retry(empty.id)


def test_a_stale_tab_neither_edits_nor_redrafts_what_it_never_showed(service: ChatService) -> None:
    conversation = service.new_conversation()
    run(service.send(conversation.id, "My parcel 48213 is late"))
    shown = service.repository.get_conversation(conversation.id).messages  # what one tab shows
    run(service.send(conversation.id, "Also, please cancel order 50001"))  # another tab moves on
    before = service.repository.get_conversation(conversation.id)
    with pytest.raises(ValueError, match="changed since this edit began"):
        service.edit_last(conversation.id, "My parcel 48213 is late (JD0146)", message_id=shown[0].id)
    with pytest.raises(ValueError, match="changed since this reply was drafted"):
        service.retry(conversation.id, last_id=shown[-1].id)
    assert service.repository.get_conversation(conversation.id) == before  # the newer message and reply stay
    # A tab that shows the conversation as it is does both.
    edit = service.edit_last(conversation.id, "Also, please cancel order 50002", message_id=before.messages[2].id)
    assert run(edit)[-1].state is TurnState.COMPLETE
    last = service.repository.get_conversation(conversation.id).messages[-1]
    assert run(service.retry(conversation.id, last_id=last.id))[-1].state is TurnState.COMPLETE
    messages = service.repository.get_conversation(conversation.id).messages
    assert [m.content for m in messages[::2]] == ["My parcel 48213 is late", "Also, please cancel order 50002"]


def test_oldest_turns_are_dropped_to_fit_and_reported(service: ChatService) -> None:
    conversation = service.new_conversation()
    for _ in range(3):  # ~2.5k tokens of history each turn on top of a ~1.8k system prompt
        service.repository.add_message(conversation.id, Role.USER, "order status please " * 250)
        service.repository.add_message(conversation.id, Role.ASSISTANT, "it ships tomorrow " * 250)
    final = run(service.send(conversation.id, "Any news?"))[-1]
    assert final.state is TurnState.COMPLETE
    assert final.num_dropped_messages >= 2 and final.num_dropped_messages % 2 == 0
    assert final.metrics["num_dropped_messages"] == final.num_dropped_messages
    assert final.metrics["num_prompt_tokens"] <= service.context_window


def test_macro_feedback_and_agent_reply(service: ChatService) -> None:
    conversation = service.new_conversation("retail", "Dana")
    greeting = service.render_macro("greeting", service.repository.get_conversation(conversation.id))
    assert "Dana" in greeting and "{" not in greeting
    reply = service.add_agent_reply(conversation.id, greeting)
    service.set_feedback(reply.id, 1)
    assert service.repository.get_message(reply.id).feedback.rating == 1  # type: ignore[union-attr]
    service.set_feedback(reply.id, None)
    assert service.repository.get_message(reply.id).feedback is None
    with pytest.raises(KeyError):
        service.new_conversation("no-such-persona")


def test_agents_reach_only_their_own_conversations(service: ChatService) -> None:
    mine = service.new_conversation("retail", "Dana", agent="alice")
    final = run(service.send(mine.id, "Where is my order?", agent="alice"))[-1]
    assert final.state is TurnState.COMPLETE
    reply_id = final.assistant_message_id
    assert reply_id is not None
    before = service.repository.get_conversation(mine.id)

    for attempt in (
        lambda: service.send(mine.id, "hijack", agent="bob"),
        lambda: service.retry(mine.id, agent="bob"),
        lambda: service.edit_last(mine.id, "hijack", agent="bob"),
        lambda: service.add_agent_reply(mine.id, "hijack", agent="bob"),
        lambda: service.set_feedback(reply_id, 1, agent="bob"),
    ):
        with pytest.raises(NotFoundError):
            attempt()
    assert not service.stop(mine.id, agent="bob")
    assert service.repository.get_conversation(mine.id) == before  # nothing bob tried was stored

    service.set_feedback(reply_id, 1, agent="alice")
    assert run(service.retry(mine.id, agent="alice"))[-1].state is TurnState.COMPLETE
    assert [c.id for c in service.repository.list_conversations(agent="alice")] == [mine.id]
    assert service.repository.list_conversations(agent="bob") == []
    # Login off (agent=None) is unscoped, as before.
    assert run(service.send(mine.id, "And the invoice?"))[-1].state is TurnState.COMPLETE


def test_drafts_use_the_deployments_sampling_settings(service: ChatService) -> None:
    params = service.sampling_params()
    s = service.settings
    assert (params.temperature, params.top_p, params.repetition_penalty) == (
        s.temperature,
        s.top_p,
        s.repetition_penalty,
    )
    assert f"repetition penalty {s.repetition_penalty:g}" in service.sampling_summary
