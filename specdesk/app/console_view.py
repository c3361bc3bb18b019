"""The Console tab's components, as one record: what ui_console.py lays out and console_actions.py drives."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


@dataclass
class ConsoleView:
    """Every component a handler reads or writes."""

    conversation_id: gr.State
    message_ids: gr.State
    editing: gr.State
    persona: gr.Dropdown
    customer: gr.Textbox
    new: gr.Button
    search: gr.Textbox
    conversations: gr.Radio
    rename_text: gr.Textbox
    rename: gr.Button
    export_json: gr.Button
    export_markdown: gr.Button
    export_file: gr.File
    delete: gr.Button
    confirm_box: gr.Group
    confirm_text: gr.Markdown
    confirm_delete: gr.Button
    cancel_delete: gr.Button
    header: gr.Markdown
    chatbot: gr.Chatbot
    status: gr.Markdown
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    edit: gr.Button
    cancel_edit: gr.Button
    macro: gr.Dropdown
    macro_text: gr.Textbox
    macro_add: gr.Button
    metrics: gr.HTML
    turns_plot: gr.BarPlot
    engine: gr.HTML
    # The card of a tool call waiting for the agent (app/tools_console.py).
    tool_card: gr.Group
    tool_title: gr.Markdown
    tool_args: gr.Code
    tool_call_id: gr.State
    tool_run: gr.Button
    tool_edit: gr.Button
    tool_reject: gr.Button
