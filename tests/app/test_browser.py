"""The console in headless Debian Chromium, driven by Playwright, as an agent would use it.

Text goes in through the keyboard and is sent with Enter, as the placeholder and the README say; buttons,
icons and the sidebar are clicked. Enter/Shift+Enter in depth, and the side-by-side tab, are in
test_browser_keyboard.py.

Needs `apt-get install chromium` and `pip install playwright` (Playwright cannot download its own
browser here, so it drives /usr/bin/chromium). Screenshots land in artifacts/.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specdesk.app.chat_service import ChatService
from specdesk.app.server import RunningServer, create_app, start_in_thread
from specdesk.app.settings import Settings
from specdesk.db import MessageStatus, Role
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm, wait_engine_idle

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PERMISSIONS = ["clipboard-read", "clipboard-write"]
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed"),
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"Debian chromium not found at {CHROMIUM}"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatService]:
    llm: LLM = tiny_console_llm(tmp_path_factory.mktemp("browser"))
    # Long replies (the tiny model never says EOS): there is time to press Stop mid-stream.
    yield make_service(llm, tmp_path_factory.mktemp("db") / "specdesk.db", max_tokens=6000)
    llm.shutdown()


@pytest.fixture(scope="module")
def server(service: ChatService) -> Iterator[RunningServer]:
    running = start_in_thread(create_app(service, Settings()))
    yield running
    running.stop()


@pytest.fixture
def page(server: RunningServer) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Clipboard access, so a test can check what a copy button copied.
        page = browser.new_page(viewport={"width": 1440, "height": 900}, permissions=PERMISSIONS)
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def open_console(page: Any, url: str) -> None:
    """Load the page and wait for the load event's data (sidebar, header) before typing."""
    page.goto(url)
    page.locator("#sd-header").get_by_text("New conversation").wait_for()


def bot_text(page: Any) -> str:
    return page.locator('#sd-chat [data-testid="bot"]').last.inner_text()


def type_into(page: Any, box: Any, text: str, *, replace: bool = False) -> None:
    """Click into `box` and type `text` key by key, as an agent does (`replace`: select what is there first)."""
    box.click()
    if replace:
        page.keyboard.press("Control+A")
    page.keyboard.type(text)


def type_and_press_enter(page: Any, message: str, *, replace: bool = False) -> None:
    """Type into the message box and press Enter: the way an agent sends."""
    type_into(page, page.locator("#sd-message textarea"), message, replace=replace)
    page.keyboard.press("Enter")


def send_and_wait_for_tokens(page: Any, message: str) -> float:
    """Send a customer message with Enter and wait until Stop is offered and the reply has begun; returns the
    deadline (30 s from now) for the caller's further waits."""
    type_and_press_enter(page, message)
    page.locator("#sd-stop").wait_for(state="visible")
    deadline = time.monotonic() + 30
    while len(bot_text(page).strip(" ▍")) < 5:
        assert time.monotonic() < deadline, "no tokens arrived"
        time.sleep(0.05)
    return deadline


def test_type_stream_stop_reload_and_reopen(page: Any, server: RunningServer, service: ChatService) -> None:
    open_console(page, server.url)
    # Tokens arrive: the reply grows while Stop is offered.
    deadline = send_and_wait_for_tokens(page, "Hello, I need help with order 48213")
    first = len(bot_text(page))
    while len(bot_text(page)) <= first:
        assert time.monotonic() < deadline, "the reply stopped growing before Stop was pressed"
        time.sleep(0.05)

    page.locator("#sd-stop").click()
    page.locator("#sd-status").get_by_text("Stopped").wait_for()
    page.locator("#sd-send").wait_for(state="visible")
    assert "stopped; partial reply kept" in bot_text(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-console-stopped.png"), full_page=True)

    summary = service.repository.list_conversations("order 48213")[0]
    messages = service.repository.get_conversation(summary.id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.STOPPED),
    ]
    assert len(messages[1].content) > 0 and messages[1].metrics is not None

    page.reload()
    entry = page.locator("#sd-conversations label").filter(has_text="Hello, I need help with order 48213")
    entry.wait_for()
    entry.click()
    page.locator('#sd-chat [data-testid="user"]').filter(has_text="order 48213").wait_for()
    assert "stopped; partial reply kept" in bot_text(page)
    page.screenshot(path=str(ARTIFACTS / "browser-console-reopened.png"), full_page=True)


def test_injected_images_and_html_never_render(page: Any, server: RunningServer, service: ChatService) -> None:
    """Customer text and model Markdown carrying images/HTML: shown inert, and no request leaves."""
    leaked: list[str] = []
    page.on("request", lambda request: leaked.append(request.url) if "exfil" in request.url else None)
    trap = f"{server.url}/exfil"
    conversation = service.new_conversation()
    service.repository.add_message(
        conversation.id, Role.USER, f'Hi ![a]({trap}?q=customer) <img src="{trap}-img"> <b id="pwned-user">x</b>'
    )
    service.add_agent_reply(
        conversation.id,
        f'**Sure.** ![status]({trap}?q=model) <img src="{trap}-model"> <script>window.pwned=1</script> '
        f'<b id="pwned-model">y</b>\n\n![ref][r]\n\n[r]: {trap}-ref.png',
    )
    service.repository.rename_conversation(conversation.id, "Injection check")
    open_console(page, server.url)
    page.locator("#sd-conversations label").filter(has_text="Injection check").click()
    page.locator('#sd-chat [data-testid="bot"]').filter(has_text="Sure.").wait_for()
    time.sleep(0.5)

    chat = page.locator("#sd-chat")
    assert chat.locator("img[src*='exfil']").count() == 0
    assert chat.locator("#pwned-user, #pwned-model, script").count() == 0
    assert page.evaluate("() => window.pwned === undefined")
    user_text = chat.locator('[data-testid="user"]').last.inner_text()
    assert "![a](" in user_text and '<img src="' in user_text  # the customer's text, exactly as typed
    assert "image removed: status" in bot_text(page) and "Sure." in bot_text(page)
    assert leaked == [], f"the page fetched attacker URLs: {leaked}"


def test_redraft_edit_macro_feedback_and_history_actions(
    page: Any, server: RunningServer, service: ChatService, tmp_path: Path
) -> None:
    """Everything in the sidebar and under the chat, each checked against the database."""
    from playwright.sync_api import expect

    def wait_ready() -> None:
        page.locator("#sd-status").get_by_text("Reply ready").wait_for()

    open_console(page, server.url)
    type_and_press_enter(page, "My invoice shows a double charge")
    page.locator("#sd-stop").click()  # long replies here: stop, then redraft to a short one
    page.locator("#sd-status").get_by_text("Stopped").wait_for()
    summary = service.repository.list_conversations("double charge")[0]

    service.settings = Settings(max_tokens=16, temperature=0.0)  # short drafts from here on
    page.locator("#sd-retry").click()
    wait_ready()
    messages = service.repository.get_conversation(summary.id).messages
    assert [m.status for m in messages] == [MessageStatus.COMPLETE, MessageStatus.COMPLETE]

    page.locator("#sd-edit").click()
    expect(page.locator("#sd-message textarea")).to_have_value("My invoice shows a double charge")
    expect(page.locator("#sd-send")).to_have_text("Save & redraft")
    type_and_press_enter(page, "My invoice shows a triple charge", replace=True)  # Enter saves & redrafts
    wait_ready()
    messages = service.repository.get_conversation(summary.id).messages
    assert len(messages) == 2 and messages[0].content == "My invoice shows a triple charge"
    expect(page.locator("#sd-send")).to_have_text("Send")

    # Copy (every message has one): the customer's text lands on the clipboard exactly as typed.
    page.locator('#sd-chat [data-testid="user"]').hover()
    page.locator('#sd-chat [aria-label="Copy message"]').first.click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "My invoice shows a triple charge"
    # 👎 on the drafted reply, stored with it.
    page.locator('#sd-chat [aria-label="Dislike"]').last.click()
    wait_for_rating(service, messages[1].id, -1)

    page.locator("#sd-macro input").click()
    page.get_by_role("option", name="Greeting").click()
    page.get_by_role("button", name="Add as agent reply").click()
    page.locator('#sd-chat [data-testid="bot"]').filter(has_text="thanks for contacting").wait_for()
    page.locator('#sd-chat [aria-label="Like"]').last.click()
    macro_reply = service.repository.get_conversation(summary.id).messages[-1]
    wait_for_rating(service, macro_reply.id, 1)

    page.get_by_text("Manage conversation").click()
    type_into(page, page.locator("#sd-rename-text textarea"), "Triple charge dispute", replace=True)
    page.keyboard.press("Enter")  # Enter in the title box renames, as the Rename button does
    page.locator("#sd-conversations label").filter(has_text="Triple charge dispute").wait_for()
    assert service.repository.get_conversation(summary.id).title == "Triple charge dispute"
    page.get_by_role("button", name="Export Markdown").click()
    assert "# Triple charge dispute" in download(page, ".md", tmp_path)
    page.get_by_role("button", name="Export JSON").click()
    exported = json.loads(download(page, ".json", tmp_path))
    assert exported["conversation"]["title"] == "Triple charge dispute"
    ratings = [(m["role"], m["feedback"] and m["feedback"]["rating"]) for m in exported["messages"]]
    assert ratings == [("user", None), ("assistant", -1), ("assistant", 1)]  # 👎 on the draft, 👍 on the macro
    assert exported["messages"][0]["content"] == "My invoice shows a triple charge"

    search = page.locator("#sd-search").get_by_role("textbox")
    type_into(page, search, "triple")
    page.locator("#sd-conversations label").filter(has_text="Triple charge dispute").wait_for()
    type_into(page, search, "no such words anywhere", replace=True)
    page.locator("#sd-conversations label").filter(has_text="Triple charge dispute").wait_for(state="detached")
    search.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Backspace")

    # New conversation empties the page; opening the old one from the sidebar brings it back.
    page.locator("#sd-new").click()
    page.locator("#sd-header").get_by_text("New conversation").wait_for()
    expect(page.locator('#sd-chat [data-testid="user"]')).to_have_count(0)
    page.locator("#sd-conversations label").filter(has_text="Triple charge dispute").click()
    page.locator("#sd-header").get_by_text("Triple charge dispute").wait_for()
    page.locator('#sd-chat [data-testid="user"]').filter(has_text="triple charge").wait_for()

    page.locator("#sd-delete").click()
    page.get_by_text("cannot be undone").wait_for()
    page.locator("#sd-confirm-delete").click()
    page.locator("#sd-header").get_by_text("New conversation").wait_for()
    assert service.repository.list_conversations("triple") == []
    page.screenshot(path=str(ARTIFACTS / "browser-console-history.png"), full_page=True)


def wait_for_rating(service: ChatService, message_id: int, rating: int) -> None:
    deadline = time.monotonic() + 10
    while (feedback := service.repository.get_message(message_id).feedback) is None or feedback.rating != rating:
        assert time.monotonic() < deadline, f"the rating {rating} was not stored"
        time.sleep(0.05)


def download(page: Any, suffix: str, folder: Path) -> str:
    """Click the export's download link and return the downloaded file's text."""
    with page.expect_download() as started:
        page.locator(f'#sd-export a[download$="{suffix}"]').click()
    saved = folder / f"export{suffix}"
    started.value.save_as(saved)
    return saved.read_text(encoding="utf-8")


def test_closing_the_tab_mid_stream_stops_and_keeps_the_partial_reply(
    page: Any, server: RunningServer, service: ChatService
) -> None:
    service.settings = Settings(max_tokens=6000, temperature=0.0)
    open_console(page, server.url)
    send_and_wait_for_tokens(page, "Please explain my roaming charges")
    page.close()  # the agent closes the tab: Gradio cancels the event and closes the handler

    summary = service.repository.list_conversations("roaming charges")[0]
    deadline = time.monotonic() + 30
    while (reply := service.repository.get_conversation(summary.id).messages[-1]).status is MessageStatus.PENDING:
        assert time.monotonic() < deadline, "the reply was never finished after the tab closed"
        time.sleep(0.1)
    assert reply.status is MessageStatus.STOPPED and reply.content
    assert not service.is_running(summary.id)
    wait_engine_idle(service.llm)
