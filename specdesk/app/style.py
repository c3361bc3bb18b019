"""The console's look: a quiet theme with local fonts only and a little CSS.

Gradio 6 takes the theme and CSS at launch/mount time, so the server passes `launch_style()` along.
Fonts are system fonts on purpose: a support console should not call a font CDN (privacy, and many
call-centre networks block it, which would stall the page).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

CSS = """
.gradio-container { max-width: 1500px !important; }
#sd-sidebar .sd-conversations { max-height: 48vh; overflow-y: auto; }
#sd-sidebar .sd-conversations label { width: 100%; justify-content: flex-start; }
#sd-header h3 { margin: 0 0 2px 0; }
#sd-header p { margin: 0; color: var(--body-text-color-subdued); font-size: 0.92em; }
#sd-status { min-height: 1.6em; font-size: 0.92em; }
#sd-status p { margin: 0; }
.sd-enter-note { font-size: 0.92em; color: var(--body-text-color-subdued); }
.sd-enter-note p { margin: 0; }
.metric-grid { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.metric { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 8px;
          background: var(--background-fill-secondary); }
.metric span { display: block; font-size: 0.78em; color: var(--body-text-color-subdued); }
.metric b { font-size: 1.15em; font-variant-numeric: tabular-nums; }
.sd-engine { font-size: 0.85em; color: var(--body-text-color-subdued); }
.sd-side h4 { margin: 0 0 4px 0; }
.sd-side-text { min-height: 220px; max-height: 320px; overflow-y: auto; white-space: pre-wrap;
                overflow-wrap: anywhere;
                border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
                background: var(--background-fill-secondary); font-size: 0.95em; }
.sd-verdict { font-size: 0.95em; }
"""


def theme() -> gr.themes.Base:
    font = [
        "Inter",
        "ui-sans-serif",
        "system-ui",
        "Segoe UI",
        "Roboto",
        "Helvetica Neue",
        "Arial",
        "sans-serif",
    ]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate", font=font, font_mono=mono).set(
        block_radius="10px", button_large_radius="8px", button_small_radius="6px"
    )


def launch_style() -> dict[str, Any]:
    """Keyword arguments for `gr.mount_gradio_app` / `Blocks.launch`."""
    return {"theme": theme(), "css": CSS}
