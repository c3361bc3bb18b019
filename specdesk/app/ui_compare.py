"""The Side-by-side tab: plain decoding vs speculation + prefix reuse, streaming at the same moment.

Enter in the message box answers (as the button does), Shift+Enter adds a line. While a comparison streams
the button is disabled and Enter starts nothing and queues nothing; a note under the box says so.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from specdesk.app import side_by_side
from specdesk.app.auth import console_cache_salt
from specdesk.app.chat_service import ChatService
from specdesk.app.side_by_side import LEFT, RIGHT, Comparison, SideState
from specdesk.app.ui_console import GENERATION_GROUP

_RUN_LABEL = "Answer both ways"
_ENTER_WHILE_ANSWERING = (
    "⏳ Both sides are still answering, so Enter started nothing. Press Enter again once they finish, "
    "or **■ Stop** to end them now."
)
# The button is disabled exactly while a comparison streams: the page as the agent sees it.
_NOTE_IF_ANSWERING_JS = f"""() => {{
  const run = document.querySelector("#sd-compare-run");
  return run !== null && run.disabled ? {json.dumps(_ENTER_WHILE_ANSWERING)} : "";
}}"""
_MAX_POINTS_PER_SIDE = 200  # enough for a smooth line; the browser need not plot every token
_EXAMPLE = "Hi, my order 48213 has not arrived yet and the tracking page has not changed in a week. Where is it?"


def build_side_by_side(service: ChatService) -> None:
    """Lay out the Side-by-side tab inside the current Blocks context and wire its events."""
    gr.Markdown(
        "One customer message answered **twice at the same moment by the same engine**. "
        "**Left:** plain decoding, one token per step, no prefix reuse. "
        "**Right:** speculative decoding with the shared prefix cache, as the console runs (the persona's "
        "system prompt is cached first, as it is after the day's first conversation). "
        "Decoding is greedy, so in float32 both sides produce exactly the same tokens: only the speed differs. "
        f"Both use the deployment's repetition penalty (**{service.settings.repetition_penalty:g}**, "
        "`--repetition-penalty`), which keeps replies out of loops that would flatter speculation."
    )
    if service.dtype_name != "float32":
        gr.Markdown(
            f"ℹ️ The model runs in **{service.dtype_name}**: its rounding depends on how requests are batched, "
            "so after a near-tie the two texts may part. Start with `--dtype float32` for token-identical output.",
            elem_classes="sd-engine",
        )
    if service.speculator_name is None:
        gr.Markdown(
            "ℹ️ No speculator is loaded (start with `--speculator`), so the right side gains from prefix "
            "reuse only.", elem_classes="sd-engine",
        )  # fmt: skip
    with gr.Row(equal_height=True):
        persona = gr.Dropdown(service.personas(), value="retail", label="Persona", scale=2, min_width=220)
        # lines=1 is what makes Gradio answer on Enter; Shift+Enter adds a line and the box grows.
        text = gr.Textbox(
            value=_EXAMPLE, label="Customer message", info="Enter answers both ways, Shift+Enter adds a line",
            lines=1, max_lines=6, scale=5, elem_id="sd-compare-text",
        )  # fmt: skip
        max_tokens = gr.Slider(16, 512, value=128, step=16, label="Max tokens", scale=1, min_width=140)
    note = gr.Markdown(elem_id="sd-compare-note", elem_classes="sd-enter-note")
    with gr.Row():
        run = gr.Button(_RUN_LABEL, variant="primary", elem_id="sd-compare-run")
        stop = gr.Button("■ Stop", variant="stop", elem_id="sd-compare-stop")
    with gr.Row(equal_height=True):
        with gr.Column(elem_classes="sd-side"):
            gr.Markdown("#### Plain decoding · no prefix reuse")
            left_stats = gr.HTML(_stats(None))
            left_text = gr.HTML(_text(None), elem_id="sd-compare-left")
        with gr.Column(elem_classes="sd-side"):
            gr.Markdown("#### Speculative decoding · prefix reuse")
            right_stats = gr.HTML(_stats(None))
            right_text = gr.HTML(_text(None), elem_id="sd-compare-right")
    verdict = gr.Markdown(elem_classes="sd-verdict", elem_id="sd-compare-verdict")
    chart = gr.LinePlot(
        _frame(None), x="seconds", y="tokens", color="side", title="Tokens over time",
        x_title="seconds since sent", y_title="tokens", height=260,
        color_map={LEFT: "#94a3b8", RIGHT: "#4f46e5"}, show_label=False,
    )  # fmt: skip

    outputs = [left_stats, left_text, right_stats, right_text, verdict, chart]

    def answer(message: str, persona_key: str, limit: float, request: gr.Request) -> Iterator[list[Any]]:
        if not message.strip():
            gr.Warning("Type a customer message to compare.")
            return
        blank = [_stats(None), _text(None), _stats(None), _text(None)]
        waiting = "⏳ Caching the persona's system prompt, then sending both requests…"
        yield [*blank, waiting, _frame(None), gr.Button("Answering…", interactive=False)]
        try:
            stream = side_by_side.compare(
                service.llm, message, persona=persona_key or "general", max_tokens=int(limit),
                variables=service.prompt_variables(None), repetition_penalty=service.settings.repetition_penalty,
                cache_salt=console_cache_salt(getattr(request, "username", None)),  # the agent's cache tenant
            )  # fmt: skip
        except (ValueError, KeyError) as exc:
            gr.Warning(str(exc))
            yield [*blank, f"⚠️ {html.escape(str(exc))}", _frame(None), gr.skip()]
            return
        for comparison in stream:
            yield [
                _stats(comparison.left), _text(comparison.left), _stats(comparison.right),
                _text(comparison.right), _verdict(comparison, service.dtype_name), _frame(comparison), gr.skip(),
            ]  # fmt: skip

    quick: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden", "api_visibility": "undocumented"}
    triggers = [run.click, text.submit]
    # The browser runs a trigger's listeners in order, each to its end: the note first, before `answer`
    # starts, so it sees whether a comparison was already streaming. JavaScript only: no round trip.
    gr.on(triggers, None, None, [note], js=_NOTE_IF_ANSWERING_JS, trigger_mode="multiple", **quick)
    # One event for the button and Enter, and "once": while it runs the browser drops both, queueing nothing.
    event = gr.on(
        triggers, answer, [text, persona, max_tokens], [*outputs, run], trigger_mode="once",
        concurrency_limit=service.max_concurrent_turns, concurrency_id=GENERATION_GROUP, show_progress="hidden",
        api_name="compare",
    )  # fmt: skip
    # However it ends (done, failed, stopped), the button comes back and the note goes.
    event.then(_ready, None, [run, note], **quick)
    event.failure(_ready, None, [run, note], **quick)
    stop.click(_ready, None, [run, note], cancels=[event], **quick)


def _ready() -> tuple[Any, str]:
    return gr.Button(_RUN_LABEL, interactive=True), ""


def _stats(side: SideState | None) -> str:
    def cell(label: str, value: str) -> str:
        return f'<div class="metric"><span>{label}</span><b>{html.escape(value)}</b></div>'

    if side is None:
        side = SideState("")
    ttft = "—" if side.ttft_s is None else f"{1000 * side.ttft_s:.0f} ms"
    speed = "—" if not side.decode_tokens_per_s else f"{side.decode_tokens_per_s:.1f}"
    total = "—" if side.total_s is None else f"{side.total_s:.2f} s"
    per_step = "—" if not side.tokens_per_step else f"{side.tokens_per_step:.2f}"
    cached = f"{side.num_cached_tokens} of {side.num_prompt_tokens}" if side.num_prompt_tokens else "—"
    cells = [
        cell("Time to first token", ttft), cell("Tokens / s", speed), cell("Total time", total),
        cell("Tokens / step", per_step), cell("Cached prompt tokens", cached),
        cell("Tokens", str(side.num_tokens)),
    ]  # fmt: skip
    return f'<div class="metric-grid">{"".join(cells)}</div>'


def _text(side: SideState | None) -> str:
    # Plain escaped text, not Markdown: this view is about comparing characters exactly.
    if side is None or (not side.text and not side.error):
        return '<div class="sd-side-text"></div>'
    body = html.escape(side.text)
    if side.error:
        body += f"\n\n⚠ {html.escape(side.error)}"
    elif not side.is_finished:
        body += " ▍"
    return f'<div class="sd-side-text">{body}</div>'


def _verdict(c: Comparison, dtype: str) -> str:
    if not c.is_finished:
        return f"✍️ Streaming… {c.elapsed_s:.1f} s"
    if c.left.error or c.right.error:
        return f"⚠️ A side failed: {html.escape(c.left.error or c.right.error or '')}"
    if c.texts_match:
        line = f"✅ **Identical output** on both sides ({c.right.num_tokens} tokens, greedy decoding)."
    elif dtype == "float32":
        line = f"⚠️ **The outputs part at token {c.first_difference}**: a bug, greedy float32 decoding must match."
    else:
        line = (
            f"ℹ️ **The outputs part at token {c.first_difference}** ({dtype} rounding differs between batch "
            "shapes; `--dtype float32` gives identical tokens)."
        )
    if c.left.total_s and c.right.total_s:
        line += f" Speculative + prefix reuse finished in {c.right.total_s:.2f} s vs {c.left.total_s:.2f} s"
        line += f" (**{c.left.total_s / c.right.total_s:.2f}×**)."
    return line


def _frame(c: Comparison | None) -> pd.DataFrame:
    # Both series always start at (0, 0): the plot fixes its colour legend from the first frame it
    # draws, and a series missing from it is never drawn later.
    rows: list[dict[str, Any]] = [{"seconds": 0.0, "tokens": 0, "side": label} for label in (LEFT, RIGHT)]
    for side in (c.left, c.right) if c is not None else ():
        points = side.points
        step = max(1, len(points) // _MAX_POINTS_PER_SIDE)
        kept = list(points[::step])
        if points and kept[-1] != points[-1]:
            kept.append(points[-1])
        rows += [{"seconds": t, "tokens": n, "side": side.label} for t, n in kept]
    # Explicit dtypes: the plot picks its axis types from the first (empty) frame it sees.
    frame = pd.DataFrame(rows, columns=["seconds", "tokens", "side"])
    return frame.astype({"seconds": "float64", "tokens": "int64", "side": "object"})
