"""What the Console tab's buttons do. Each handler returns {component: new value} for what changed.

Handlers talk to the ChatService (turns, personas, macros, feedback) and its repository (history);
they never touch the engine or SQL directly. Failures become a toast (gr.Warning) and a status line,
never a stack trace in the agent's face.

With login on, every handler acts as the signed-in agent (`request.username`, which Gradio fills in
from the session): the sidebar lists only their conversations and anyone else's behaves as missing.
With login off the username is None and nothing is scoped.

Exports are private files: one 0700 folder per agent under a 0700 root, unguessable names, deleted
with their conversation and at exit. Gradio serves a returned file from a copy in its cache, at a path
named by the content's hash (so another signed-in session cannot guess it); that copy is deleted with
the conversation too, and app/ui.py has Gradio sweep its cache.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import processing_utils

from specdesk.app import views
from specdesk.app.chat_service import ChatService
from specdesk.app.console_view import ConsoleView
from specdesk.app.safe_markdown import escape_customer_text
from specdesk.app.tools_card import tool_card
from specdesk.app.turns import TurnState, TurnUpdate
from specdesk.db import NotFoundError, Role
from specdesk.db.export_files import ExportFiles
from specdesk.db.repository import DEFAULT_TITLE

Updates = dict[Any, Any]
# Streaming updates to the browser at most this often: tokens arrive faster than anyone reads.
_MIN_YIELD_INTERVAL_S = 0.05


class ConsoleActions:
    """The Console tab's event handlers, bound to one service and one set of components."""

    def __init__(self, service: ChatService, view: ConsoleView) -> None:
        self.service = service
        self.repo = service.repository
        self.v = view
        self.persona_titles = {key: title for title, key in service.personas()}
        self.exports = ExportFiles()

    @property
    def all_outputs(self) -> list[Any]:
        v = self.v
        return [
            v.conversation_id, v.message_ids, v.editing, v.conversations, v.rename_text, v.export_file,
            v.confirm_box, v.header, v.chatbot, v.status, v.message, v.send, v.stop, v.retry, v.edit,
            v.cancel_edit, v.metrics, v.turns_plot, v.new, v.tool_card, v.tool_title, v.tool_args, v.tool_call_id,
        ]  # fmt: skip

    # ---- turns ------------------------------------------------------------------------------------
    def send(
        self, text: str, conversation_id: int | None, editing: int | bool, persona: str, customer: str, search: str,
        request: gr.Request,
    ) -> Iterator[Updates]:  # fmt: skip
        """editing: the id of the customer message being edited (True: whichever is last), or False."""
        agent = _agent(request)
        if not text.strip():
            gr.Warning("Type or paste the customer's message first.")
            return
        created: int | None = None
        try:
            if conversation_id is None:
                conversation_id = created = self.service.new_conversation(
                    persona or "general", customer or "", agent=agent
                ).id
            if editing:
                message_id = None if editing is True else int(editing)
                updates = self.service.edit_last(conversation_id, text, agent=agent, message_id=message_id)
            else:
                self._title_from_first_message(conversation_id, text, agent)
                updates = self.service.send(conversation_id, text, agent=agent)
        except Exception as exc:  # bad text, someone else's conversation, the database failing
            if created is not None:  # nothing was stored in it: leave no empty conversation behind
                self._safely(lambda: self.repo.delete_conversation(created, agent=agent))
            gr.Warning(_message(exc))
            if editing and created is None and conversation_id is not None:  # show it as it is now
                yield self._current(conversation_id, search, agent, end_edit=True)
            return
        yield from self._stream(conversation_id, updates, search, agent, clear_message=True)

    def retry(
        self, conversation_id: int | None, message_ids: list[int], search: str, request: gr.Request
    ) -> Iterator[Updates]:
        agent = _agent(request)
        if conversation_id is None:
            gr.Warning("Open a conversation first.")
            return
        try:  # the last message this tab shows: a stale tab must not replace a reply it never showed
            updates = self.service.retry(conversation_id, agent=agent, last_id=message_ids[-1] if message_ids else None)
        except (ValueError, NotFoundError) as exc:
            gr.Warning(str(exc))
            if isinstance(exc, ValueError):
                yield self._current(conversation_id, search, agent)
            return
        yield from self._stream(conversation_id, updates, search, agent, clear_message=False)

    def stop(self, conversation_id: int | None, request: gr.Request) -> None:
        if conversation_id is not None:
            self.service.stop(conversation_id, agent=_agent(request))

    def _stream(
        self,
        conversation_id: int,
        updates: Iterator[TurnUpdate],
        search: str,
        agent: str | None,
        *,
        clear_message: bool,
    ) -> Iterator[Updates]:
        try:
            yield from self._stream_view(conversation_id, updates, search, agent, clear_message=clear_message)
        except Exception as exc:  # the database failed around the turn: the service has already ended it
            gr.Warning(f"The reply failed: {_message(exc)}")
            v = self.v  # the list was locked for the turn (_view's busy): unlock it, or it stays locked
            yield {v.status: f"⚠️ {escape_customer_text(_message(exc))}", v.conversations: gr.Radio(interactive=True),
                   **self._busy(False)}  # fmt: skip

    def _stream_view(
        self,
        conversation_id: int,
        updates: Iterator[TurnUpdate],
        search: str,
        agent: str | None,
        *,
        clear_message: bool,
    ) -> Iterator[Updates]:
        v = self.v
        conversation = self.repo.get_conversation(conversation_id, agent=agent)
        shown, _ = views.chat_messages(conversation)
        first: Updates = {
            **self._view(conversation_id, search, agent, busy=True),
            v.chatbot: [*shown, {"role": "assistant", "content": " ▍"}],
            v.status: "⏳ Waiting for the engine…",
            **self._busy(True),
        }
        if clear_message:
            first[v.message] = ""
        yield first
        last_yield = 0.0
        final: TurnUpdate | None = None
        # closing() matters: when the browser goes away Gradio closes this generator, and closing the
        # service's stream aborts the engine request and stores the partial reply as stopped.
        with contextlib.closing(updates):  # type: ignore[type-var]
            for update in updates:
                if update.state.is_final:
                    final = update
                    break
                if time.perf_counter() - last_yield >= _MIN_YIELD_INTERVAL_S:
                    last_yield = time.perf_counter()
                    yield {
                        v.chatbot: [*shown, views.live_bubble(update)],
                        v.status: views.status_line(update),
                    }
        done = self._view(conversation_id, search, agent)
        if final is not None:
            done[v.status] = views.status_line(final)
            done[v.metrics] = views.metrics_card(final.metrics)
            if final.state is TurnState.ERROR:
                gr.Warning(final.error or "The reply failed.")
        yield {**done, **self._busy(False)}

    def _busy(self, busy: bool) -> Updates:
        """While a reply streams: Stop replaces Send, and nothing may switch or rewrite the conversation."""
        v = self.v
        return {
            v.send: gr.Button("Send", visible=not busy),
            v.stop: gr.Button(visible=busy),
            v.retry: gr.Button(interactive=not busy),
            v.edit: gr.Button(interactive=not busy),
            v.new: gr.Button(interactive=not busy),
            v.editing: False,
            v.cancel_edit: gr.Button(visible=False),
        }

    def _title_from_first_message(self, conversation_id: int, text: str, agent: str | None) -> None:
        conversation = self.repo.get_conversation(conversation_id, agent=agent)
        if conversation.title == DEFAULT_TITLE and not any(m.role is Role.USER for m in conversation.messages):
            self.repo.rename_conversation(conversation_id, views.title_from(text), agent=agent)

    # ---- editing and feedback ------------------------------------------------------------------------
    def start_edit(self, conversation_id: int | None, request: gr.Request) -> Updates:
        v = self.v
        if conversation_id is None:
            gr.Warning("Open a conversation first.")
            return {}
        try:
            conversation = self.repo.get_conversation(conversation_id, agent=_agent(request))
        except NotFoundError as exc:
            gr.Warning(str(exc))
            return {}
        users = [m for m in conversation.messages if m.role is Role.USER]
        if not users:
            gr.Warning("This conversation has no customer message yet.")
            return {}
        return {
            v.message: users[-1].content,
            v.editing: users[-1].id,  # Save checks it is still the last one (another tab may have moved on)
            v.send: gr.Button("Save & redraft"),
            v.cancel_edit: gr.Button(visible=True),
            v.status: "✎ Editing the last customer message: **Save & redraft** replaces it and drafts a new reply.",
        }

    def cancel_edit(self) -> Updates:
        v = self.v
        return {
            v.message: "",
            v.editing: False,
            v.send: gr.Button("Send"),
            v.cancel_edit: gr.Button(visible=False),
            v.status: "",
        }

    def feedback(self, message_ids: list[int], like: gr.LikeData, request: gr.Request) -> None:
        index = like.index if isinstance(like.index, int) else like.index[0]
        if not 0 <= index < len(message_ids):
            return
        rating = 1 if like.liked is True else -1 if like.liked is False else None
        try:
            self.service.set_feedback(message_ids[index], rating, agent=_agent(request))
        except (ValueError, NotFoundError) as exc:
            gr.Warning(str(exc))

    # ---- history -------------------------------------------------------------------------------------
    def new_conversation(self, search: str, request: gr.Request) -> Updates:
        return {**self._view(None, search, _agent(request)), self.v.message: "", **self._busy(False)}

    def open(self, conversation_id: int | None, search: str, request: gr.Request) -> Updates:
        agent = _agent(request)
        try:
            return {**self._view(conversation_id, search, agent), **self._busy(False)}
        except NotFoundError:
            gr.Warning("That conversation no longer exists.")
            return self._view(None, search, agent)

    def search(self, search: str, conversation_id: int | None, request: gr.Request) -> Any:
        return gr.Radio(choices=self._choices(search, _agent(request)), value=conversation_id)

    def rename(self, conversation_id: int | None, title: str, search: str, request: gr.Request) -> Updates:
        agent = _agent(request)
        if conversation_id is None:
            gr.Warning("Open a conversation first.")
            return {}
        self._safely(lambda: self.repo.rename_conversation(conversation_id, title, agent=agent))
        return self._view(conversation_id, search, agent)

    def ask_delete(self, conversation_id: int | None, request: gr.Request) -> tuple[Any, str]:
        if conversation_id is None:
            gr.Warning("Open a conversation first.")
            return gr.Group(visible=False), ""
        title = self.repo.get_conversation(conversation_id, agent=_agent(request)).title
        text = f"Delete **{escape_customer_text(title)}** and all its messages? This cannot be undone."
        return gr.Group(visible=True), text

    def delete(self, conversation_id: int | None, search: str, request: gr.Request) -> Updates:
        agent = _agent(request)
        if conversation_id is not None:
            if self.service.is_running(conversation_id):
                gr.Warning("Stop the reply being drafted before deleting this conversation.")
                return {}
            if self._safely(lambda: self.repo.delete_conversation(conversation_id, agent=agent)):
                self.exports.forget(agent, conversation_id)  # its exports go with it
                gr.Info("Conversation deleted.")
        return {**self._view(None, search, agent), self.v.confirm_box: gr.Group(visible=False)}

    def export_json(self, conversation_id: int | None, request: gr.Request) -> Any:
        return self._export(conversation_id, "json", _agent(request))

    def export_markdown(self, conversation_id: int | None, request: gr.Request) -> Any:
        return self._export(conversation_id, "md", _agent(request))

    def _export(self, conversation_id: int | None, kind: str, agent: str | None) -> Any:
        if conversation_id is None:
            gr.Warning("Open a conversation first.")
            return gr.File(visible=False)
        try:
            if kind == "json":
                body = json.dumps(self.repo.export_json(conversation_id, agent=agent), indent=2, ensure_ascii=False)
            else:
                body = self.repo.export_markdown(conversation_id, agent=agent)
        except NotFoundError as exc:
            gr.Warning(str(exc))
            return gr.File(visible=False)
        path = self.exports.write(agent, conversation_id, kind, body)
        # Gradio serves a copy from its cache, named as processing_utils.save_file_to_cache names it.
        cached = Path(self.v.export_file.GRADIO_CACHE) / processing_utils.hash_file(path) / path.name
        self.exports.remove_with(agent, conversation_id, cached)
        return gr.File(value=str(path), visible=True)

    # ---- macros --------------------------------------------------------------------------------------
    def preview_macro(self, key: str | None, conversation_id: int | None, request: gr.Request) -> tuple[Any, str]:
        if not key:
            return gr.Row(visible=False), ""
        agent = _agent(request)
        conversation = self.repo.get_conversation(conversation_id, agent=agent) if conversation_id is not None else None
        return gr.Row(visible=True), self.service.render_macro(key, conversation)

    def add_macro(
        self, text: str, conversation_id: int | None, persona: str, customer: str, search: str, request: gr.Request
    ) -> Updates:
        agent = _agent(request)
        if not text.strip():
            gr.Warning("The macro is empty.")
            return {}
        if conversation_id is None:
            conversation_id = self.service.new_conversation(persona or "general", customer or "", agent=agent).id
        self._safely(lambda: self.service.add_agent_reply(conversation_id, text, agent=agent))
        return {**self._view(conversation_id, search, agent), self.v.macro: None}

    # ---- shared views --------------------------------------------------------------------------------
    def engine_stats(self) -> str:
        s = self.service
        return views.engine_line(s.engine_stats(), s.model_name, s.speculator_name, s.sampling_summary)

    def _view(self, conversation_id: int | None, search: str, agent: str | None, *, busy: bool = False) -> Updates:
        """Everything that shows one conversation (or the empty 'new conversation' page).

        While a reply streams (`busy`) the list is locked: switching would leave the stream writing
        into another conversation's view.
        """
        v = self.v
        conversation = self.repo.get_conversation(conversation_id, agent=agent) if conversation_id is not None else None
        shown, ids = views.chat_messages(conversation)
        last_metrics = next(
            (m.metrics for m in reversed(conversation.messages) if m.metrics), None
        ) if conversation else None  # fmt: skip
        return {
            v.conversation_id: conversation_id,
            v.message_ids: ids,
            v.chatbot: gr.Chatbot(value=shown, feedback_value=views.feedback_values(conversation)),  # type: ignore[arg-type]
            v.header: views.header(conversation, self.persona_titles),
            v.conversations: gr.Radio(
                choices=self._choices(search, agent), value=conversation_id, interactive=not busy
            ),
            v.rename_text: conversation.title if conversation else "",
            v.export_file: gr.File(value=None, visible=False),
            v.confirm_box: gr.Group(visible=False),
            v.metrics: views.metrics_card(last_metrics),
            v.turns_plot: views.turns_frame(conversation),
            v.status: "",
            **tool_card(v, None if busy else conversation),  # a call waiting for the agent, once no reply runs
        }

    def _current(self, conversation_id: int, search: str, agent: str | None, *, end_edit: bool = False) -> Updates:
        """The conversation as it is now, after a refused turn (nothing when even that fails)."""
        try:
            updates = self._view(conversation_id, search, agent)
        except Exception as exc:
            gr.Warning(_message(exc))
            return {}
        if end_edit:  # the typed text stays in the box; Send now sends it as a new message
            updates.update(self._busy(False))
        return updates

    def _choices(self, search: str, agent: str | None) -> list[tuple[str, int]]:
        try:
            return views.sidebar_choices(self.repo.list_conversations(search or None, agent=agent))
        except ValueError as exc:
            gr.Warning(str(exc))
            return []

    @staticmethod
    def _safely(action: Callable[[], object]) -> bool:
        """Run `action`; a failure becomes a toast. Returns whether it succeeded."""
        try:
            action()
        except Exception as exc:
            gr.Warning(_message(exc))
            return False
        return True


def _message(exc: BaseException) -> str:
    """What a toast says: the message of the errors we raise, the type too for anything else."""
    if isinstance(exc, KeyError):
        return str(exc.args[0])
    if isinstance(exc, (ValueError, NotFoundError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _agent(request: gr.Request | None) -> str | None:
    """The signed-in agent who scopes this event, or None with login off (Gradio leaves username unset)."""
    return None if request is None else request.username
