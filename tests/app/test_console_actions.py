"""The Console tab's handlers on a real service: with logins on, an agent's page shows only their conversations
and their exports stay theirs; a stale tab (another moved the conversation on) edits and redrafts nothing; a
turn that fails around its stream leaves the conversation list unlocked."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from specdesk.app import ui
from specdesk.app.chat_service import ChatService
from specdesk.app.console_actions import ConsoleActions
from specdesk.db import Role
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import console_actions, make_service, tiny_console_llm


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("console-privacy"))
    yield engine
    engine.shutdown()


@pytest.fixture
def service(llm: LLM, tmp_path: Path) -> ChatService:
    return make_service(llm, tmp_path / "specdesk.db", max_tokens=8)


@pytest.fixture
def actions(service: ChatService) -> Iterator[ConsoleActions]:
    with console_actions(service) as handlers:
        yield handlers


def signed_in(name: str | None) -> Any:
    return SimpleNamespace(username=name)  # what handlers read from gr.Request


def test_page_load_lists_only_the_signed_in_agents_conversations(service: ChatService) -> None:
    alice = service.new_conversation("retail", "Dana", agent="alice")
    bob = service.new_conversation("retail", "Eve", agent="bob")
    choices, who, *_ = ui.page_load(service, "alice")
    assert [value for _, value in choices.choices] == [alice.id]
    assert "alice" in who
    choices, *_ = ui.page_load(service, "bob")
    assert [value for _, value in choices.choices] == [bob.id]
    # Login off: the one local agent sees everything.
    choices, who, *_ = ui.page_load(service, None)
    assert sorted(value for _, value in choices.choices) == sorted([alice.id, bob.id]) and who == ""


def test_sidebar_search_is_scoped(service: ChatService, actions: ConsoleActions) -> None:
    mine = service.new_conversation("retail", "Dana", agent="alice")
    service.new_conversation("retail", "Dana", agent="bob")
    assert [value for _, value in actions.search("Dana", None, signed_in("alice")).choices] == [mine.id]


def _exported_path(update: Any) -> Path:
    value = update.value if not isinstance(update, dict) else update["value"]
    return Path(value["path"] if isinstance(value, dict) else value)


def test_exports_are_private_and_go_with_their_conversation(service: ChatService, actions: ConsoleActions) -> None:
    conversation = service.new_conversation("retail", "Dana", agent="alice")
    service.repository.add_message(conversation.id, Role.USER, "Card 4111 1111")
    # What the browser gets is Gradio's served copy (in its cache, under a content-hash folder).
    served = [_exported_path(actions.export_json(conversation.id, signed_in("alice")))]
    served.append(_exported_path(actions.export_markdown(conversation.id, signed_in("alice"))))
    assert "4111" in served[0].read_text()
    root = actions.exports.root
    originals = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(originals) == 2 and {p.name for p in originals} == {p.name for p in served}
    assert all(not p.is_relative_to(root) for p in served)

    # Private on disk: 0700 folders (root and the agent's own), 0600 files, names nobody can guess.
    agent_folder = originals[0].parent
    assert agent_folder.parent == root and agent_folder.name != "alice"
    for folder in (root, agent_folder):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (*originals, *served):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not path.name.startswith(f"conversation-{conversation.id}.") and len(path.stem) > 30

    # Another agent gets nothing, not even an error that says the conversation exists.
    assert actions.export_json(conversation.id, signed_in("bob")).visible is False

    # Deleting the conversation deletes every export of it, the served copies included.
    actions.delete(conversation.id, "", signed_in("alice"))
    assert not any(p.exists() for p in (*originals, *served))


def test_exports_are_deleted_at_shutdown(service: ChatService, actions: ConsoleActions) -> None:
    conversation = service.new_conversation("retail", "Dana", agent="alice")
    path = _exported_path(actions.export_markdown(conversation.id, signed_in("alice")))
    assert path.is_file()
    actions.exports.close()
    assert not actions.exports.root.exists()


def _cached_tokens(service: ChatService, conversation_id: int, text: str, agent: str) -> int:
    updates = list(service.send(conversation_id, text, agent=agent))
    return int(updates[-1].metrics.get("num_cached_tokens") or 0)


def test_each_agent_is_a_prefix_cache_tenant_of_their_own(service: ChatService) -> None:
    # Same persona and customer text: without per-agent salts bob's first turn would reuse alice's pages,
    # and the cached-token count would tell bob what alice's customer wrote.
    service.llm.reset_prefix_cache()
    text = "My parcel never arrived and the tracking page has said 'in transit' for nine days now."
    first = service.new_conversation("retail", "Dana", agent="alice")
    assert _cached_tokens(service, first.id, text, "alice") == 0
    again = service.new_conversation("retail", "Dana", agent="alice")
    assert _cached_tokens(service, again.id, text, "alice") > 0  # alice's own pages are reused
    other = service.new_conversation("retail", "Dana", agent="bob")
    assert _cached_tokens(service, other.id, text, "bob") == 0


LOGIN_OFF: Any = SimpleNamespace(username=None)  # what handlers read from gr.Request


def _send(actions: ConsoleActions, text: str, conversation_id: int | None, editing: int | bool = False) -> Any:
    return list(actions.send(text, conversation_id, editing, "general", "", "", LOGIN_OFF))


def test_a_stale_tab_refuses_to_edit_or_redraft_and_shows_the_conversation_as_it_is(
    service: ChatService, actions: ConsoleActions
) -> None:
    v = actions.v
    first = _send(actions, "My parcel 48213 is late", None)[-1]
    conversation_id = first[v.conversation_id]
    stale_ids = first[v.message_ids]
    editing = actions.start_edit(conversation_id, LOGIN_OFF)[v.editing]  # tab 1 starts an edit
    assert editing == stale_ids[0]
    _send(actions, "Also, please cancel order 50001", conversation_id)  # tab 2 moves on
    before = service.repository.get_conversation(conversation_id)

    with pytest.warns(UserWarning, match="changed since this edit began"):
        refused = _send(actions, "My parcel 48213 is late (JD0146)", conversation_id, editing)
    assert refused[-1][v.editing] is False and refused[-1][v.message_ids] == [m.id for m in before.messages]
    with pytest.warns(UserWarning, match="changed since this reply was drafted"):
        redraft = list(actions.retry(conversation_id, stale_ids, "", LOGIN_OFF))
    assert redraft[-1][v.message_ids] == [m.id for m in before.messages]
    assert service.repository.get_conversation(conversation_id) == before  # the newer turn is intact

    # The refreshed tab edits and redrafts what it now shows.
    editing = actions.start_edit(conversation_id, LOGIN_OFF)[v.editing]
    _send(actions, "Also, please cancel order 50002", conversation_id, editing)
    assert service.repository.get_conversation(conversation_id).messages[2].content.endswith("50002")
    current = [m.id for m in service.repository.get_conversation(conversation_id).messages]
    assert list(actions.retry(conversation_id, current, "", LOGIN_OFF))[-1][v.stop].visible is False


def test_a_turn_that_fails_around_the_stream_unlocks_the_conversation_list(
    service: ChatService, actions: ConsoleActions
) -> None:
    v = actions.v
    conversation_id = service.new_conversation().id
    updates = actions.send("Where is my parcel?", conversation_id, False, "general", "", "", LOGIN_OFF)
    first = next(updates)
    assert first[v.conversations].interactive is False  # locked while the reply streams
    service.repository.delete_conversation(conversation_id)  # another tab deletes it mid-turn
    with pytest.warns(UserWarning, match="The reply failed"):
        last = list(updates)[-1]
    assert last[v.conversations].interactive is True and last[v.stop].visible is False
