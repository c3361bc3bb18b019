"""The agent console's Gradio UI, built by `build_demo(service)`; nothing here loads a model.

Two tabs: the Console (history sidebar, streaming chat, the turn's metrics) and the Side-by-side
latency view. The theme and CSS travel separately (app/style.py), because Gradio 6 takes them at
launch/mount time.
"""

from __future__ import annotations

import gradio as gr

from specdesk.app import views
from specdesk.app.chat_service import ChatService
from specdesk.app.ui_compare import build_side_by_side
from specdesk.app.ui_console import build_console


def build_demo(service: ChatService) -> gr.Blocks:
    """The whole console around one shared service (one engine, one database)."""
    with gr.Blocks(title="SpecDesk · agent console", fill_width=True, analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown("## SpecDesk &nbsp;<small>agent console</small>", elem_id="sd-title")
            signed_in = gr.Markdown(elem_id="sd-signed-in", elem_classes="sd-engine")
        with gr.Tabs():
            with gr.Tab("Console", id="console"):
                console = build_console(service)
            with gr.Tab("Side by side", id="side-by-side"):
                build_side_by_side(service)

        def on_load(request: gr.Request) -> tuple[object, str, str, str, str]:
            summaries = service.repository.list_conversations()
            who = f"Signed in as **{request.username}**" if request and request.username else ""
            stats = views.engine_line(service.engine_stats(), service.model_name, service.speculator_name)
            choices = gr.Radio(choices=views.sidebar_choices(summaries), value=None)
            return choices, who, stats, views.header(None, {}), views.metrics_card(None)

        loaded = [console.conversations, signed_in, console.engine, console.header, console.metrics]
        demo.load(on_load, None, loaded, show_progress="hidden", api_visibility="undocumented")
    return demo
