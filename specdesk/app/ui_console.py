"""The Console tab: history sidebar, the chat, and the turn's metrics beside it.

Layout only; what each button does lives in app/console_actions.py. Generation events share one
concurrency group sized to the engine's batch, so every agent's turn runs at once and the engine
batches them; quick events (Stop, sidebar, feedback) are never queued behind a stream.

Keyboard: Enter in the message box sends (as Send does), Shift+Enter adds a line, Enter in the title box
renames. Enter while a reply streams sends nothing and queues nothing, and a note under the box says so.
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from specdesk.app import views
from specdesk.app.chat_service import ChatService
from specdesk.app.console_actions import ConsoleActions
from specdesk.app.console_view import ConsoleView
from specdesk.app.tools_console import ToolActions

GENERATION_GROUP = "specdesk-generation"
ENTER_WHILE_DRAFTING = (
    "⏳ A reply is still being drafted, so Enter sent nothing: your text stays in the box. "
    "Press Enter again once the reply is ready, or **■ Stop** to end it now."
)
# Stop replaces Send exactly while a reply streams (ConsoleActions._busy): the page as the agent sees it.
_NOTE_IF_DRAFTING_JS = f"""() => {{
  const stop = document.querySelector("#sd-stop");
  return stop !== null && stop.offsetParent !== null ? {json.dumps(ENTER_WHILE_DRAFTING)} : "";
}}"""


def build_console(service: ChatService) -> ConsoleView:
    """Lay out the Console tab inside the current Blocks context and wire its events."""
    personas = service.personas()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260, elem_id="sd-sidebar"):
            new = gr.Button("+ New conversation", variant="primary", elem_id="sd-new")
            persona = gr.Dropdown(personas, value="general", label="Persona for new conversations")
            customer = gr.Textbox(label="Customer name", placeholder="optional, used in greetings")
            search = gr.Textbox(placeholder="Search conversations…", show_label=False, elem_id="sd-search")
            conversations = gr.Radio(
                [], label="Conversations", elem_id="sd-conversations", elem_classes="sd-conversations"
            )
            with gr.Accordion("Manage conversation", open=False, elem_id="sd-manage"):
                rename_text = gr.Textbox(label="Title", elem_id="sd-rename-text")
                rename = gr.Button("Rename", size="sm")
                with gr.Row():
                    export_json = gr.Button("Export JSON", size="sm")
                    export_markdown = gr.Button("Export Markdown", size="sm")
                export_file = gr.File(label="Export", visible=False, interactive=False, elem_id="sd-export")
                delete = gr.Button("Delete…", size="sm", variant="stop", elem_id="sd-delete")
                with gr.Group(visible=False) as confirm_box:
                    confirm_text = gr.Markdown()
                    with gr.Row():
                        confirm_delete = gr.Button(
                            "Delete for good", variant="stop", size="sm", elem_id="sd-confirm-delete"
                        )
                        cancel_delete = gr.Button("Keep it", size="sm")

        with gr.Column(scale=3, min_width=420):
            header = gr.Markdown(elem_id="sd-header")
            chatbot = gr.Chatbot(
                height=560,
                elem_id="sd-chat",
                buttons=["copy", "copy_all"],
                sanitize_html=True,
                allow_tags=False,
                latex_delimiters=[],  # "$5 and $10" in a banking chat is money, not LaTeX
                feedback_options=("Like", "Dislike"),
                placeholder="Paste the customer's message below. Drafted replies stream here.",
                show_label=False,
                layout="bubble",
                group_consecutive_messages=False,  # one bubble per stored message: feedback maps 1:1
            )
            with gr.Group(visible=False, elem_id="sd-tool-card") as tool_card:
                tool_title = gr.Markdown(elem_id="sd-tool-title")
                tool_args = gr.Code(
                    language="json", interactive=False, lines=3, label="Arguments", elem_id="sd-tool-args"
                )
                with gr.Row():
                    tool_run = gr.Button("▶ Run", variant="primary", size="sm", elem_id="sd-tool-run")
                    tool_edit = gr.Button("✎ Edit arguments", size="sm", elem_id="sd-tool-edit")
                    tool_reject = gr.Button("✕ Reject", variant="stop", size="sm", elem_id="sd-tool-reject")
            status = gr.Markdown(elem_id="sd-status")
            with gr.Row(equal_height=True):
                # lines=1 is what makes Gradio send on Enter; a multi-line box sends on Shift+Enter instead.
                # It still grows to max_lines as Shift+Enter adds lines.
                message = gr.Textbox(
                    placeholder="Customer's message… (Enter sends, Shift+Enter adds a line)",
                    show_label=False, lines=1, max_lines=8, scale=6, elem_id="sd-message", autofocus=True,
                )  # fmt: skip
                send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="sd-send")
                stop = gr.Button("■ Stop", variant="stop", scale=1, min_width=90, visible=False, elem_id="sd-stop")
            enter_note = gr.Markdown(elem_id="sd-enter-note", elem_classes="sd-enter-note")
            with gr.Row():
                retry = gr.Button("↻ Redraft reply", size="sm", elem_id="sd-retry")
                edit = gr.Button("✎ Edit last customer message", size="sm", elem_id="sd-edit")
                cancel_edit = gr.Button("Cancel edit", size="sm", visible=False)
                macro = gr.Dropdown(
                    service.macros(), value=None, label="Insert a macro", scale=2, min_width=200,
                    elem_id="sd-macro",
                )  # fmt: skip
            with gr.Row(visible=False) as macro_row:
                macro_text = gr.Textbox(label="Macro (fill in the [brackets])", lines=3, scale=5)
                macro_add = gr.Button("Add as agent reply", size="sm", scale=1)

        with gr.Column(scale=1, min_width=240):
            gr.Markdown("#### This turn")
            metrics = gr.HTML(elem_id="sd-metrics")
            turns_plot = gr.BarPlot(
                views.turns_frame(None), x="turn", y="tokens/s", title="tokens/s per turn", height=220,
                x_title="turn", y_title=" ", show_label=False, sort="x", tooltip="all",
                y_lim=[0, None],
            )  # fmt: skip
            engine = gr.HTML(elem_classes="sd-engine")

    view = ConsoleView(
        gr.State(None), gr.State([]), gr.State(False), persona, customer, new, search, conversations,
        rename_text, rename, export_json, export_markdown, export_file, delete, confirm_box, confirm_text,
        confirm_delete, cancel_delete, header, chatbot, status, message, send, stop, retry, edit,
        cancel_edit, macro, macro_text, macro_add, metrics, turns_plot, engine,
        tool_card, tool_title, tool_args, gr.State(None), tool_run, tool_edit, tool_reject,
    )  # fmt: skip
    _wire(view, ConsoleActions(service, view), macro_row, enter_note, service.max_concurrent_turns)
    return view


def _wire(v: ConsoleView, actions: ConsoleActions, macro_row: gr.Row, enter_note: gr.Markdown, batch_size: int) -> None:
    everything = actions.all_outputs
    # Only `send` is a documented API endpoint; the OpenAI-compatible /v1 is the programmatic interface.
    quick: dict[str, Any] = {
        "concurrency_limit": None,
        "show_progress": "hidden",
        "api_visibility": "undocumented",
    }
    stream: dict[str, Any] = {
        "concurrency_limit": batch_size, "concurrency_id": GENERATION_GROUP, "show_progress": "hidden",
        "api_visibility": "undocumented",
    }  # fmt: skip

    turn_inputs = [v.message, v.conversation_id, v.editing, v.persona, v.customer, v.search]
    send_triggers = [v.send.click, v.message.submit]
    # The browser runs a trigger's listeners in order, each to its end: the note first, before the send
    # starts, so it sees whether a reply was already streaming. JavaScript only: no queue, no round trip.
    gr.on(send_triggers, None, None, [enter_note], js=_NOTE_IF_DRAFTING_JS, trigger_mode="multiple", **quick)
    # One event for Send and Enter, and "once": while it runs (a reply streams) the browser drops both.
    sent = gr.on(
        send_triggers, actions.send, turn_inputs, everything, trigger_mode="once",
        **{**stream, "api_name": "send", "api_visibility": "public"},
    )  # fmt: skip
    sent.then(None, None, [enter_note], js='() => ""', **quick)
    retry_inputs = [v.conversation_id, v.message_ids, v.search]
    v.retry.click(actions.retry, retry_inputs, everything, **stream)
    v.chatbot.retry(actions.retry, retry_inputs, everything, **stream)
    v.stop.click(actions.stop, [v.conversation_id], None, **quick)

    v.edit.click(actions.start_edit, [v.conversation_id], everything, **quick)
    v.cancel_edit.click(actions.cancel_edit, None, everything, **quick)
    v.chatbot.like(actions.feedback, [v.message_ids], None, **quick)
    # The chat's trash icon clears the view, never the history: it starts a new conversation.
    v.chatbot.clear(actions.new_conversation, [v.search], everything, **quick)

    v.new.click(actions.new_conversation, [v.search], everything, **quick)
    v.conversations.input(actions.open, [v.conversations, v.search], everything, **quick)
    v.search.change(actions.search, [v.search, v.conversation_id], [v.conversations], **quick)
    rename_inputs = [v.conversation_id, v.rename_text, v.search]
    gr.on([v.rename.click, v.rename_text.submit], actions.rename, rename_inputs, everything, **quick)
    v.export_json.click(actions.export_json, [v.conversation_id], [v.export_file], **quick)
    v.export_markdown.click(actions.export_markdown, [v.conversation_id], [v.export_file], **quick)
    v.delete.click(actions.ask_delete, [v.conversation_id], [v.confirm_box, v.confirm_text], **quick)
    v.cancel_delete.click(lambda: gr.Group(visible=False), None, [v.confirm_box], **quick)
    v.confirm_delete.click(actions.delete, [v.conversation_id, v.search], everything, **quick)

    v.macro.change(actions.preview_macro, [v.macro, v.conversation_id], [macro_row, v.macro_text], **quick)
    v.macro_add.click(
        actions.add_macro, [v.macro_text, v.conversation_id, v.persona, v.customer, v.search],
        [*everything, macro_row, v.macro], **quick,
    )  # fmt: skip
    gr.Timer(3.0).tick(actions.engine_stats, None, [v.engine], **quick)

    tools = ToolActions(actions)  # the card of a proposed tool call: Run and Reject continue the reply
    v.tool_run.click(tools.run, [v.tool_call_id, v.tool_args, v.conversation_id, v.search], everything, **stream)
    v.tool_reject.click(tools.reject, [v.tool_call_id, v.conversation_id, v.search], everything, **stream)
    v.tool_edit.click(tools.edit, None, [v.tool_args, v.tool_title], **quick)
