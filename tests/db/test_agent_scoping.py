"""Per-agent scoping on a real SQLite file: an agent sees, opens and changes only their conversations."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from specdesk.db import ChatRepository, NotFoundError, Role


def _two_agents(repo: ChatRepository) -> tuple[int, int, int]:
    """alice's and bob's conversations (each with a rated reply), plus one made with login off."""
    ids = []
    for agent in ("alice", "bob", None):
        conversation = repo.create_conversation(f"Parcel of {agent}", agent=agent)
        repo.add_message(conversation.id, Role.USER, "Where is my parcel?", agent=agent)
        repo.add_message(conversation.id, Role.ASSISTANT, "On its way.", agent=agent)
        ids.append(conversation.id)
    return ids[0], ids[1], ids[2]


def test_listing_is_scoped_to_the_agent(repo: ChatRepository) -> None:
    alice, bob, unowned = _two_agents(repo)
    assert [c.id for c in repo.list_conversations(agent="alice")] == [alice]
    assert [c.id for c in repo.list_conversations("parcel", agent="bob")] == [bob]
    assert repo.list_conversations(agent="carol") == []
    assert {c.id for c in repo.list_conversations()} == {alice, bob, unowned}  # login off: unscoped
    assert repo.get_conversation(alice).agent == "alice"
    assert repo.get_conversation(unowned).agent is None


def test_another_agents_conversation_is_indistinguishable_from_a_missing_one(repo: ChatRepository) -> None:
    alice, bob, unowned = _two_agents(repo)
    bob_reply = repo.get_conversation(bob).messages[1].id
    attempts: list[Callable[[int], object]] = [
        lambda cid: repo.get_conversation(cid, agent="alice"),
        lambda cid: repo.rename_conversation(cid, "mine now", agent="alice"),
        lambda cid: repo.update_conversation(cid, customer_name="Eve", agent="alice"),
        lambda cid: repo.add_message(cid, Role.USER, "hijack", agent="alice"),
        lambda cid: repo.start_assistant_message(cid, agent="alice"),
        lambda cid: repo.delete_messages_after(cid, -1, agent="alice"),
        lambda cid: repo.export_json(cid, agent="alice"),
        lambda cid: repo.export_markdown(cid, agent="alice"),
        lambda cid: repo.delete_conversation(cid, agent="alice"),
    ]
    for attempt in attempts:
        for cid in (bob, unowned, 9999):
            with pytest.raises(NotFoundError) as caught:
                attempt(cid)
            assert str(caught.value) == str(NotFoundError("conversation", cid))
    for message_attempt in (
        lambda: repo.set_feedback(bob_reply, 1, agent="alice"),
        lambda: repo.clear_feedback(bob_reply, agent="alice"),
        lambda: repo.update_message_content(bob_reply, "changed", agent="alice"),
    ):
        with pytest.raises(NotFoundError):
            message_attempt()
    untouched = repo.get_conversation(bob)
    assert untouched.title == "Parcel of bob" and len(untouched.messages) == 2
    assert untouched.messages[1].content == "On its way." and untouched.messages[1].feedback is None
    assert repo.get_conversation(alice, agent="alice").title == "Parcel of alice"


def test_an_agent_works_on_their_own_conversation(repo: ChatRepository) -> None:
    alice, bob, _ = _two_agents(repo)
    repo.rename_conversation(alice, "Renamed", agent="alice")
    reply = repo.start_assistant_message(alice, agent="alice")
    repo.finish_assistant_message(reply.id, "Arrives Monday.")
    repo.set_feedback(reply.id, -1, agent="alice")
    assert repo.export_json(alice, agent="alice")["conversation"]["title"] == "Renamed"
    repo.delete_conversation(alice, agent="alice")
    assert repo.list_conversations(agent="alice") == []
    assert [c.id for c in repo.list_conversations(agent="bob")] == [bob]


def test_unscoped_calls_reach_every_conversation(repo: ChatRepository) -> None:
    alice, bob, unowned = _two_agents(repo)
    for cid in (alice, bob, unowned):
        repo.rename_conversation(cid, "Triage")
        assert repo.export_markdown(cid).startswith("#")
    repo.delete_conversation(bob)
    assert {c.id for c in repo.list_conversations()} == {alice, unowned}
