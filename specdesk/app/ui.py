"""The agent console's Gradio UI, built by `build_demo(service)`; nothing here loads a model.

Two tabs: the Console (history sidebar, streaming chat, the turn's metrics) and the Side-by-side
latency view. With login on, a page lists only the signed-in agent's conversations. The theme and
CSS travel separately (app/style.py), because Gradio 6 takes them at launch/mount time.
"""

from __future__ import annotations

import gradio as gr

from specdesk.app import views
from specdesk.app.chat_service import ChatService
from specdesk.app.safe_markdown import escape_customer_text
from specdesk.app.ui_compare import build_side_by_side
from specdesk.app.ui_console import build_console

# (how often, how old) in seconds: Gradio's file cache is swept of anything older than this.
EXPORT_CACHE_S = (1800, 1800)


def build_demo(service: ChatService) -> gr.Blocks:
    """The whole console around one shared service (one engine, one database)."""
    # delete_cache: Gradio's served copies of exports (and anything else it cached) expire within the
    # hour and go entirely at restart; the console also deletes an export's copy with its conversation.
    with gr.Blocks(
        title="SpecDesk · agent console", fill_width=True, analytics_enabled=False, delete_cache=EXPORT_CACHE_S
    ) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown("## SpecDesk &nbsp;<small>agent console</small>", elem_id="sd-title")
            signed_in = gr.Markdown(elem_id="sd-signed-in", elem_classes="sd-engine")
        with gr.Tabs():
            with gr.Tab("Console", id="console"):
                console = build_console(service)
            with gr.Tab("Side by side", id="side-by-side"):
                build_side_by_side(service)

        def on_load(request: gr.Request) -> tuple[gr.Radio, str, str, str, str]:
            return page_load(service, request.username if request else None)

        loaded = [console.conversations, signed_in, console.engine, console.header, console.metrics]
        demo.load(on_load, None, loaded, show_progress="hidden", api_visibility="undocumented")
    return demo


def page_load(service: ChatService, agent: str | None) -> tuple[gr.Radio, str, str, str, str]:
    """What a fresh page shows: the sidebar (only `agent`'s conversations; all with login off, agent
    None), who is signed in, the engine line, an empty header and metrics card."""
    summaries = service.repository.list_conversations(agent=agent)
    who = f"Signed in as **{escape_customer_text(agent)}**" if agent else ""
    stats = views.engine_line(
        service.engine_stats(), service.model_name, service.speculator_name, service.sampling_summary
    )
    choices = gr.Radio(choices=views.sidebar_choices(summaries), value=None)
    return choices, who, stats, views.header(None, {}), views.metrics_card(None)
